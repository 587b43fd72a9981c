#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine, for testing the launch scripts for real.
#
#   tools/slurm_local.sh install          apt-get install slurm-wlm + munge when missing (needs root)
#   tools/slurm_local.sh start [DIR]      write DIR/slurm.conf, start munged, slurmctld, slurmd; wait for the node
#   tools/slurm_local.sh stop  [DIR]      cancel the jobs, stop the daemons this script started, keep the logs
#   tools/slurm_local.sh env   [DIR]      print `export SLURM_CONF=...` for the clients (sbatch, srun, squeue)
#
# DIR (default $VIOLET_SLURM_DIR or /tmp/violet_ds_slurm) holds everything: configuration, munge key and
# socket, state, spool, pid files and logs, so a test cluster never touches a system SLURM or munge
# (its own ports, its own munge socket). Node CPUs = max(nproc, VIOLET_SLURM_CPUS or 4) with
# `SlurmdParameters=config_overrides`, so a 2-core machine still accepts a 2-task job with a spare slot.
# A requeued job may start again after the credential lifetime (cred_expire, default here 10 s instead
# of SLURM's 120 s) so that preemption tests stay short.
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${VIOLET_SLURM_DIR:-/tmp/violet_ds_slurm}}"
START_TIMEOUT_S="${VIOLET_SLURM_START_TIMEOUT_S:-60}"

die() { echo "slurm_local: $*" >&2; exit 1; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
               && command -v munged >/dev/null; }

install() {
    have_slurm && return 0
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are missing and installing them needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
    have_slurm || die "slurm-wlm installed but slurmctld/slurmd/sbatch/munged are still not on PATH"
}

free_port() {
    python3 - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local host cpus ctld_port slurmd_port
    host="$(hostname -s)"
    cpus="$(nproc)"
    local min_cpus="${VIOLET_SLURM_CPUS:-4}"
    [ "$cpus" -ge "$min_cpus" ] || cpus="$min_cpus"
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done
    cat >"$DIR/slurm.conf" <<EOF
# one-node test cluster written by tools/slurm_local.sh
ClusterName=violetds
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${DIR}/munge.socket,cred_expire=${VIOLET_SLURM_CRED_EXPIRE_S:-10}
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in containers: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# a requeued job becomes eligible after cred_expire; look for it every few seconds, not every 30-60 s
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_munge() {
    if pid_alive "$DIR/munged.pid"; then return 0; fi
    if [ ! -s "$DIR/munge.key" ]; then
        # munge accepts any key of 32..1024 bytes; a fresh random one keeps this cluster private
        head -c 1024 /dev/urandom >"$DIR/munge.key"
        chmod 0400 "$DIR/munge.key"
    fi
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" \
        || die "munged did not start (see $DIR/munged.log)"
}

start() {
    install
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 0755 "$DIR"
    if pid_alive "$DIR/slurmctld.pid" || pid_alive "$DIR/slurmd.pid"; then
        echo "slurm_local: a cluster from $DIR is already running; restarting it" >&2
        stop
        mkdir -p "$DIR/state" "$DIR/spool"
    fi
    write_conf
    export SLURM_CONF="$DIR/slurm.conf"
    start_munge
    # -i: ignore state left by an earlier cluster in DIR (jobs, node state)
    slurmctld -i -f "$SLURM_CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
    slurmd -f "$SLURM_CONF" -N "$(hostname -s)" || die "slurmd did not start (see $DIR/slurmd.log)"
    local waited=0
    until sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; do
        if [ "$waited" -ge "$START_TIMEOUT_S" ]; then
            echo "slurm_local: node not idle after ${START_TIMEOUT_S}s; sinfo says:" >&2
            sinfo -N -l >&2 || true
            tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
            stop
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_daemon() {
    local pidfile="$1" name="$2"
    pid_alive "$pidfile" || return 0
    local pid
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.2
    done
    echo "slurm_local: $name (pid $pid) ignored SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    [ -f "$DIR/slurm.conf" ] || return 0
    export SLURM_CONF="$DIR/slurm.conf"
    if pid_alive "$DIR/slurmctld.pid"; then
        scancel --full --signal=KILL --state=RUNNING -u "$(id -un)" 2>/dev/null || true
        scancel -u "$(id -un)" 2>/dev/null || true
        # let slurmd reap the cancelled steps (their slurmstepd processes exit with them) before it stops
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    stop_daemon "$DIR/slurmd.pid" slurmd
    stop_daemon "$DIR/slurmctld.pid" slurmctld
    stop_daemon "$DIR/munged.pid" munged
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
