# Network settings of the ranks on one host (sourced by srun_task.sh, rank.sh, local.sh and slurm_common.sh).
#
# violet_ds_network_env MASTER WHO   picks the interface this host uses to reach the master address (the
#     interface that holds the address when this host is the master, else the one `ip route get` names) and
#     exports it as GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME, so that gloo and NCCL do not bind to whatever
#     the host name resolves to (a loopback address in many /etc/hosts, a management network on clusters).
#     A variable the user set is kept as it is. Loopback (one host) sets nothing. Logs one line to stderr
#     naming the host, WHO (e.g. the rank) and the choice.
# violet_ds_fail_fast_env   NCCL defaults that end a rank when a peer dies instead of leaving it blocked:
#     TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (the watchdog aborts the communicator and the process on an NCCL
#     error or a collective past engine.dist_timeout_s) and TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=300 (the
#     process is ended when the watchdog itself hangs that long). Values set by the user are kept.

violet_ds_route_iface() {
    local addr="$1" ip dev
    command -v ip >/dev/null || return 0
    ip="$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR == 1 {print $1}')"
    [ -n "$ip" ] || return 0
    dev="$(ip -o -4 addr show to "$ip" 2>/dev/null | awk '{print $2; exit}')"
    [ -n "$dev" ] || dev="$(ip -o route get "$ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)"
    [ "$dev" = lo ] && dev=""
    echo "$ip $dev"
}

violet_ds_network_env() {
    local master="$1" who="${2:-}" route ip dev note="" var
    route="$(violet_ds_route_iface "$master")"
    read -r ip dev <<<"$route" || true
    for var in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
        if [ -n "${!var:-}" ]; then
            note="$note $var=${!var} (set by the user)"
        elif [ -n "${dev:-}" ]; then
            export "$var=$dev"
            note="$note $var=$dev"
        fi
    done
    echo "[violet-ds ${who:+$who }on $(hostname -s 2>/dev/null || hostname)] network: master $master (${ip:-unresolved})" \
        "reached through ${dev:-loopback or an unknown interface}${note:+;$note}" >&2
}

violet_ds_fail_fast_env() {
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-300}"
}
