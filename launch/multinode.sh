#!/usr/bin/env bash
# Several hosts over ssh through the DeepSpeed launcher (pdsh by default), without SLURM.
#
#   launch/multinode.sh -H HOSTFILE [-p MASTER_PORT] [-a MASTER_ADDR] [-l LAUNCHER] COMMAND [violet-ds arguments ...]
#   launch/multinode.sh -H hostfile pretrain --config launch/configs/pretrain_demo.yaml
#   DS_ACCELERATOR=cpu launch/multinode.sh -H hostfile pretrain --config launch/configs/pretrain_demo.yaml
#
# HOSTFILE has one `host slots=N` line per host (DeepSpeed's format, N ranks there); the first host is the
# master unless -a names another address; MASTER_PORT defaults to 29500. Run it on one of the hosts.
# Every host must reach the others by the names in the hostfile, and accept ssh from this one without a
# password; pdsh passes PDSH_SSH_ARGS_APPEND to ssh (e.g. "-F my_ssh_config"), and this script checks
# every host with the same ssh options before starting. The checkout, the interpreter and the data must
# be at the same paths on every host.
#
# The ranks run launch/rank.sh: it picks each host's network interface towards the master (logged),
# applies the NCCL fail-fast defaults and execs `python -m violet_ds.cli COMMAND ...`. Variables the ranks
# need (DS_ACCELERATOR, OMP_NUM_THREADS, TOKENIZERS_PARALLELISM, TORCH_NCCL_*, NCCL_*, GLOO_*, VIOLET_DS_*;
# PYTHONPATH goes by itself) reach every host through a DeepSpeed environment file (DS_ENV_FILE) written
# here, after the lines of ~/.deepspeed_env and ./.deepspeed_env. When a rank fails, the launcher on
# its host stops that host's ranks; the others fail at their next collective (gloo at once, NCCL through
# TORCH_NCCL_ASYNC_ERROR_HANDLING or engine.dist_timeout_s), and the command exits non-zero.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hostfile=""
port="${MASTER_PORT:-29500}"
addr=""
launcher="pdsh"
while [ $# -gt 0 ]; do
    case "$1" in
        -H|--hostfile) hostfile="$2"; shift 2 ;;
        -p|--master_port) port="$2"; shift 2 ;;
        -a|--master_addr) addr="$2"; shift 2 ;;
        -l|--launcher) launcher="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
if [ -z "$hostfile" ] || [ $# -eq 0 ]; then
    sed -n '2,21p' "$0" >&2
    exit 2
fi
[ -f "$hostfile" ] || { echo "multinode.sh: no hostfile $hostfile" >&2; exit 2; }
hosts="$(awk '!/^[[:space:]]*#/ && NF {print $1}' "$hostfile")"
[ -n "$hosts" ] || { echo "multinode.sh: $hostfile names no host" >&2; exit 2; }
addr="${addr:-$(echo "$hosts" | head -n 1)}"
python="${VIOLET_DS_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"

ds_args=()
if [ "$launcher" = pdsh ]; then
    # the launcher's own check runs plain `ssh first-host`, without pdsh's ssh options: check every host
    # with those options instead, and name the one that fails
    for host in $hosts; do
        # shellcheck disable=SC2086
        if ! ssh ${PDSH_SSH_ARGS_APPEND:-} -o BatchMode=yes -o ConnectTimeout=10 "$host" true </dev/null; then
            echo "multinode.sh: ssh $host fails (ssh ${PDSH_SSH_ARGS_APPEND:-}$host true): every host must accept ssh from $(hostname -s) without a password" >&2
            exit 1
        fi
    done
    ds_args+=(--no_ssh_check)
fi

env_file="$(mktemp "${TMPDIR:-/tmp}/violet-ds-env.XXXXXX")"
{
    for existing in "$HOME/.deepspeed_env" ./.deepspeed_env; do
        [ ! -f "$existing" ] || grep -v '^[[:space:]]*$' "$existing" || true
    done
    env | grep -E '^(DS_ACCELERATOR|OMP_NUM_THREADS|TOKENIZERS_PARALLELISM|TORCH_NCCL_[A-Z_]*|NCCL_[A-Z_]*|GLOO_[A-Z_]*|VIOLET_DS_[A-Z_]*)=' \
        | grep -v '^VIOLET_DS_\(MASTER_ADDR\|PYTHON\)=' || true
    echo "VIOLET_DS_MASTER_ADDR=$addr"
    echo "VIOLET_DS_PYTHON=$python"
} >"$env_file"
export DS_ENV_FILE="$env_file"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

echo "[violet-ds multinode $(date -u +%FT%TZ)] $(echo $hosts | wc -w) host(s) from $hostfile ($(echo $hosts | tr '\n' ' ')), master $addr:$port, launcher $launcher" >&2
status=0
deepspeed --hostfile "$hostfile" --launcher "$launcher" "${ds_args[@]}" --master_addr "$addr" --master_port "$port" \
    --no_python --no_local_rank "$root/launch/rank.sh" "$@" || status=$?
rm -f "$env_file"
exit "$status"
