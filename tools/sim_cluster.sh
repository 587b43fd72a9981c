#!/usr/bin/env bash
# A simulated cluster of N nodes on this machine, for running the launch scripts across "hosts" for real.
#
#   tools/sim_cluster.sh up DIR [NODES] [--slurm] [--ssh]   start it (needs root, iproute2 and util-linux)
#   tools/sim_cluster.sh down DIR                           stop everything it started, remove every namespace
#   tools/sim_cluster.sh exec DIR NODE CMD [ARGS ...]       run a command on node NODE (node0, node1, ...)
#   tools/sim_cluster.sh env DIR                            print `export SLURM_CONF=...` for sbatch/squeue here
#   tools/sim_cluster.sh status DIR                         nodes, addresses, daemons
#
# Each node is a network namespace (`ip netns`, named <prefix>-nodeK) with its own address on a veth pair
# whose other end sits on a bridge in this machine's namespace (10.213.X.1), plus its own UTS namespace
# (hostname nodeK), and its own mount namespace with a private /dev/shm and an /etc/hosts that names every
# node. The filesystem is shared, as on a cluster with a shared home. A `sleep` process per node holds
# the UTS and mount namespaces; entering a node is `nsenter` into that process's namespaces.
#
# --slurm: munged here (socket DIR/munge.socket), slurmctld on node0, one `slurmd -N nodeK` inside each
# node (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, 4 CPUs per node whatever the machine
# has). --ssh: an sshd on port 22 of every node accepting the key DIR/ssh/id_ed25519 for root; the client
# configuration DIR/ssh/config (host key checking off) is what `ssh -F` / PDSH_SSH_ARGS_APPEND take.
# Packages missing for either (slurm-wlm, munge, openssh-server, and pdsh for the DeepSpeed launcher) are
# installed with apt-get.
#
# `down` works from DIR/cluster.env, written as each piece comes up, so it also cleans up after an `up`
# that failed half-way: every process inside the nodes' namespaces is ended (TERM, then KILL), then the
# namespaces, the veth pairs and the bridge are deleted. Logs stay in DIR.
set -euo pipefail

cmd="${1:-}"
DIR="${2:-}"
die() { echo "sim_cluster: $*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" >&2; exit 2; }
[ -n "$cmd" ] && [ -n "$DIR" ] || usage
case "$DIR" in /*) ;; *) DIR="$(pwd)/$DIR" ;; esac
STATE="$DIR/cluster.env"
START_TIMEOUT_S="${VIOLET_SIM_START_TIMEOUT_S:-90}"

record() { echo "$1" >>"$STATE"; }

requirements() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, veth pairs, mounts)"
    # `ip netns` makes /run/netns a mount point of its own; `down` unmounts it again when it made it
    # and no namespace is left
    if ! grep -q " /run/netns " /proc/self/mountinfo; then NETNS_MOUNT_NEW=1; fi
    for tool in ip unshare nsenter mount; do
        command -v "$tool" >/dev/null || die "$tool is not installed"
    done
    ip netns list >/dev/null 2>&1 || die "\`ip netns\` does not work here"
}

install_packages() {
    local missing=()
    if [ "$1" = 1 ]; then
        for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || missing+=(slurm-wlm munge); done
    fi
    if [ "$2" = 1 ]; then
        [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
        command -v ssh >/dev/null || missing+=(openssh-client)
    fi
    if [ "${#missing[@]}" != 0 ]; then
        command -v apt-get >/dev/null || die "missing ${missing[*]} and there is no apt-get to install them"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
    # pdsh is the DeepSpeed launcher's default ssh backend; without it the cluster still works over ssh
    if [ "$2" = 1 ] && ! command -v pdsh >/dev/null && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pdsh >/dev/null \
            || echo "sim_cluster: apt-get install pdsh failed; the DeepSpeed launcher's pdsh backend is unavailable" >&2
    fi
}

# a /24 under 10.213/16 that no interface here uses yet; X comes from DIR so that two clusters differ
pick_subnet() {
    local x
    x=$(( $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 250 + 2 ))
    for _ in $(seq 1 250); do
        if ! ip -o -4 addr show | grep -q " 10\.213\.$x\." && ! ip netns list | grep -q "^vds$x-"; then
            echo "$x"
            return 0
        fi
        x=$(( x % 250 + 2 ))
    done
    die "no free 10.213.X.0/24 subnet"
}

node_pid() { eval "echo \${NODE_${1#node}_PID:-}"; }

enter() {
    local node="$1"
    shift
    [ -f "$STATE" ] || die "no cluster in $DIR"
    # shellcheck disable=SC1090
    source "$STATE"
    local pid
    pid="$(node_pid "$node")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || die "node $node of $DIR is not running"
    exec nsenter -t "$pid" -n -u -m --wd="$PWD" -- "$@"
}

start_node() {
    local k="$1" ns="$PREFIX-node$1" host_if="${PREFIX}n$1" ip="10.213.$SUBNET.$(( $1 + 2 ))"
    ip netns add "$ns"
    record "NODE_${k}_NS=$ns"
    ip link add "$host_if" type veth peer name eth0 netns "$ns"
    ip link set "$host_if" master "$BRIDGE" up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    record "NODE_${k}_IP=$ip"
    # the holder: its own hostname, /dev/shm and /etc/hosts, then sleep; its pid names the node's namespaces
    rm -f "$DIR/node$k.pid"
    setsid nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- /bin/sh -c '
        hostname "$1" && mount -t tmpfs -o mode=1777,size=1g "vds-shm-$1" /dev/shm \
            && mount --bind "$2" /etc/hosts && echo $$ >"$3.tmp" && mv "$3.tmp" "$3" && exec sleep infinity' \
        holder "node$k" "$DIR/hosts" "$DIR/node$k.pid" </dev/null >"$DIR/node$k.holder.log" 2>&1 &
    local waited=0
    until [ -s "$DIR/node$k.pid" ]; do
        [ "$waited" -lt 100 ] || die "node$k did not come up: $(cat "$DIR/node$k.holder.log")"
        sleep 0.1
        waited=$((waited + 1))
    done
    local pid
    pid="$(cat "$DIR/node$k.pid")"
    record "NODE_${k}_PID=$pid"
    record "NODE_${k}_UTS=$(readlink "/proc/$pid/ns/uts")"
}

write_slurm_conf() {
    local nodes_line="" k
    {
        echo "# simulated $NODES-node cluster written by tools/sim_cluster.sh"
        echo "ClusterName=violetsim"
        echo "SlurmctldHost=node0($NODE_0_IP)"
        echo "SlurmctldPort=6817"
        echo "SlurmdPort=6818"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$DIR/munge.socket,cred_expire=${VIOLET_SLURM_CRED_EXPIRE_S:-10}"
        echo "StateSaveLocation=$DIR/slurm/state"
        echo "SlurmdSpoolDir=$DIR/slurm/spool-%n"
        echo "SlurmctldPidFile=$DIR/slurm/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/slurm/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/slurm/slurmctld.log"
        echo "SlurmdLogFile=$DIR/slurm/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        echo "# no cgroups in containers: track processes through /proc, bind nothing"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=bf_interval=2,sched_interval=2"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "SlurmdTimeout=60"
        echo "InactiveLimit=0"
        for k in $(seq 0 $((NODES - 1))); do
            eval "echo \"NodeName=node$k NodeAddr=\$NODE_${k}_IP CPUs=${VIOLET_SLURM_CPUS:-4} State=UNKNOWN\""
        done
        echo "PartitionName=debug Nodes=node[0-$((NODES - 1))] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } >"$DIR/slurm.conf"
}

start_slurm() {
    mkdir -p "$DIR/slurm/state"
    write_slurm_conf
    export SLURM_CONF="$DIR/slurm.conf"
    if [ ! -s "$DIR/munge.key" ]; then
        head -c 1024 /dev/urandom >"$DIR/munge.key"
        chmod 0400 "$DIR/munge.key"
    fi
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" || die "munged did not start (see $DIR/munged.log)"
    record "MUNGED=1"
    record "SLURM=1"
    nsenter -t "$NODE_0_PID" -n -u -m -- slurmctld -i -f "$SLURM_CONF" \
        || die "slurmctld did not start (see $DIR/slurm/slurmctld.log)"
    local k pid
    for k in $(seq 0 $((NODES - 1))); do
        mkdir -p "$DIR/slurm/spool-node$k"
        pid="$(node_pid "node$k")"
        nsenter -t "$pid" -n -u -m -- slurmd -f "$SLURM_CONF" -N "node$k" \
            || die "slurmd on node$k did not start (see $DIR/slurm/slurmd-node$k.log)"
    done
    local waited=0
    until [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)')" = "$NODES" ]; do
        if [ "$waited" -ge "$START_TIMEOUT_S" ]; then
            sinfo -N -l >&2 || true
            tail -n 20 "$DIR"/slurm/*.log >&2 || true
            die "the SLURM nodes are not idle after ${START_TIMEOUT_S}s"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

start_ssh() {
    mkdir -p "$DIR/ssh"
    chmod 0700 "$DIR/ssh"
    [ -s "$DIR/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C sim-host -f "$DIR/ssh/host_ed25519"
    [ -s "$DIR/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C sim-client -f "$DIR/ssh/id_ed25519"
    cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"
    cat >"$DIR/ssh/sshd_config" <<EOF
Port 22
HostKey $DIR/ssh/host_ed25519
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AuthorizedKeysFile $DIR/ssh/authorized_keys
PrintMotd no
LogLevel ERROR
EOF
    cat >"$DIR/ssh/config" <<EOF
Host *
    User root
    IdentityFile $DIR/ssh/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
EOF
    if [ ! -d /run/sshd ]; then
        # sshd's privilege-separation directory; removed again by `down`
        mkdir -p -m 0755 /run/sshd
        record "CREATED_RUN_SSHD=1"
    fi
    record "SSH=1"
    local k pid ip
    for k in $(seq 0 $((NODES - 1))); do
        pid="$(node_pid "node$k")"
        eval "ip=\$NODE_${k}_IP"
        nsenter -t "$pid" -n -u -m -- /usr/sbin/sshd -f "$DIR/ssh/sshd_config" -o "ListenAddress=$ip" \
            -o "PidFile=$DIR/ssh/sshd-node$k.pid" -E "$DIR/ssh/sshd-node$k.log" \
            || die "sshd on node$k did not start (see $DIR/ssh/sshd-node$k.log)"
    done
    for k in $(seq 0 $((NODES - 1))); do
        local waited=0
        until nsenter -t "$NODE_0_PID" -n -u -m -- ssh -F "$DIR/ssh/config" -o ConnectTimeout=5 "node$k" true \
                2>/dev/null; do
            [ "$waited" -lt 20 ] || die "ssh from node0 to node$k does not work (see $DIR/ssh/sshd-node$k.log)"
            sleep 0.5
            waited=$((waited + 1))
        done
    done
}

up() {
    local slurm=0 ssh=0
    NODES=2
    for arg in "$@"; do
        case "$arg" in
            --slurm) slurm=1 ;;
            --ssh) ssh=1 ;;
            [0-9]*) NODES="$arg" ;;
            *) usage ;;
        esac
    done
    [ "$NODES" -ge 1 ] && [ "$NODES" -le 200 ] || die "NODES must be 1..200"
    requirements
    install_packages "$slurm" "$ssh"
    mkdir -p "$DIR"
    [ ! -f "$STATE" ] || die "$DIR already holds a cluster (tools/sim_cluster.sh down $DIR first)"
    SUBNET="$(pick_subnet)"
    PREFIX="vds$SUBNET"
    BRIDGE="${PREFIX}br"
    record "PREFIX=$PREFIX"
    record "NETNS_MOUNT_NEW=${NETNS_MOUNT_NEW:-0}"
    record "SUBNET=$SUBNET"
    record "NODES=$NODES"
    # from here on a failure tears down what exists
    trap 'echo "sim_cluster: up failed; tearing down" >&2; down >&2 || true' EXIT
    ip link add "$BRIDGE" type bridge
    record "BRIDGE=$BRIDGE"
    ip addr add "10.213.$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    {
        cat /etc/hosts
        echo "# simulated cluster ($DIR)"
        echo "10.213.$SUBNET.1 sim-gateway"
        for k in $(seq 0 $((NODES - 1))); do echo "10.213.$SUBNET.$((k + 2)) node$k"; done
    } >"$DIR/hosts"
    for k in $(seq 0 $((NODES - 1))); do start_node "$k"; done
    # shellcheck disable=SC1090
    source "$STATE"
    [ "$slurm" = 0 ] || start_slurm
    [ "$ssh" = 0 ] || start_ssh
    trap - EXIT
    echo "sim_cluster: $NODES node(s) up in $DIR: $(for k in $(seq 0 $((NODES - 1))); do eval "printf 'node%s=%s ' $k \$NODE_${k}_IP"; done)"
    [ "$slurm" = 0 ] || echo "export SLURM_CONF=$DIR/slurm.conf"
}

# every process whose UTS or network namespace is one of the node's
node_processes() {
    local uts="$1" ns="$2" proc pid
    {
        [ -z "$ns" ] || ip netns pids "$ns" 2>/dev/null || true
        if [ -n "$uts" ]; then
            for proc in /proc/[0-9]*; do
                [ "$(readlink "$proc/ns/uts" 2>/dev/null)" = "$uts" ] && echo "${proc#/proc/}"
            done
        fi
    } | sort -un | grep -vx "$$" || true
}

stop_pidfile() {
    local pidfile="$1" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

down() {
    [ -f "$STATE" ] || return 0
    # shellcheck disable=SC1090
    source "$STATE"
    local k
    if [ "${SLURM:-0}" = 1 ] && [ -n "${NODE_0_PID:-}" ] && kill -0 "$NODE_0_PID" 2>/dev/null; then
        export SLURM_CONF="$DIR/slurm.conf"
        timeout 20 scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
        timeout 20 scancel --user=root 2>/dev/null || true
    fi
    # end everything inside the nodes: TERM, a moment, then KILL; the holders (sleep) go with the rest
    local pids="" uts ns
    for k in $(seq 0 $((${NODES:-0} - 1))); do
        eval "uts=\${NODE_${k}_UTS:-}; ns=\${NODE_${k}_NS:-}"
        pids="$pids $(node_processes "$uts" "$ns")"
    done
    if [ -n "${pids// /}" ]; then
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 1 30); do
            local alive=""
            for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
            [ -n "$alive" ] || break
            sleep 0.1
        done
        for k in $(seq 0 $((${NODES:-0} - 1))); do
            eval "uts=\${NODE_${k}_UTS:-}; ns=\${NODE_${k}_NS:-}"
            pids="$(node_processes "$uts" "$ns")"
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        done
        sleep 0.2
    fi
    [ "${MUNGED:-0}" = 0 ] || stop_pidfile "$DIR/munged.pid"
    for k in $(seq 0 $((${NODES:-0} - 1))); do
        eval "ns=\${NODE_${k}_NS:-}"
        [ -z "$ns" ] || ! ip netns list | grep -q "^$ns\b" || ip netns del "$ns" || true
    done
    [ -z "${BRIDGE:-}" ] || ! ip link show "$BRIDGE" >/dev/null 2>&1 || ip link del "$BRIDGE" || true
    if [ "${CREATED_RUN_SSHD:-0}" = 1 ]; then rmdir /run/sshd 2>/dev/null || true; fi
    if [ "${NETNS_MOUNT_NEW:-0}" = 1 ] && [ -z "$(ip netns list 2>/dev/null)" ]; then
        while grep -q " /run/netns " /proc/self/mountinfo; do umount /run/netns 2>/dev/null || break; done
    fi
    rm -f "$DIR"/node*.pid
    mv "$STATE" "$DIR/cluster.env.down"
}

status() {
    [ -f "$STATE" ] || { echo "no cluster in $DIR"; return 1; }
    # shellcheck disable=SC1090
    source "$STATE"
    local k pid ip
    for k in $(seq 0 $((NODES - 1))); do
        eval "pid=\${NODE_${k}_PID:-}; ip=\${NODE_${k}_IP:-}"
        printf 'node%s %s holder %s %s\n' "$k" "$ip" "$pid" "$(kill -0 "$pid" 2>/dev/null && echo up || echo DOWN)"
    done
    if [ "${SLURM:-0}" = 1 ]; then SLURM_CONF="$DIR/slurm.conf" sinfo -N 2>&1 || true; fi
}

case "$cmd" in
    up) shift 2; up "$@" ;;
    down) down ;;
    exec) [ $# -ge 4 ] || usage; node="$3"; shift 3; enter "$node" "$@" ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    status) status ;;
    *) usage ;;
esac
