#!/usr/bin/env bash
# Single-node run with N processes through the DeepSpeed launcher (GPUs, or CPU with DS_ACCELERATOR=cpu).
#
#   launch/local.sh [-n NPROC] [-p MASTER_PORT] COMMAND [violet-ds arguments ...]
#   launch/local.sh -n 2 pretrain --config launch/configs/pretrain_demo.yaml
#   DS_ACCELERATOR=cpu launch/local.sh -n 2 pretrain --config launch/configs/pretrain_demo.yaml --run.max_steps 4
#   launch/local.sh -n 2 --script path/to/script.py [script arguments ...]   (any script, e.g. a debug probe)
#
# NPROC defaults to the number of visible GPUs (CUDA_VISIBLE_DEVICES or nvidia-smi), else 1. The
# launcher sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for every process; the
# `--local_rank=N` it appends is dropped by violet_ds.cli. One failing rank stops all of them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=""
port="${MASTER_PORT:-}"
script=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--nproc) nproc="$2"; shift 2 ;;
        -p|--master_port) port="$2"; shift 2 ;;
        --script) script="$2"; shift 2; break ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
if [ -z "$script" ] && [ $# -eq 0 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi

if [ -z "$nproc" ]; then
    if [ "${DS_ACCELERATOR:-}" = cpu ]; then
        nproc=1
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        nproc="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nproc="$(nvidia-smi -L | grep -c '^GPU')"
    else
        nproc=1
    fi
fi
if [ -z "$port" ]; then
    # a free port: two local runs on one machine must not meet at the default 29500
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck source=launch/network.sh
source "$root/launch/network.sh"
violet_ds_fail_fast_env
if [ "${DS_ACCELERATOR:-}" = cpu ]; then
    # N ranks share the machine's cores instead of each taking all of them
    cores="$(nproc)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
fi

launcher=(deepspeed --num_gpus "$nproc" --master_addr 127.0.0.1 --master_port "$port")
if [ -n "$script" ]; then
    exec "${launcher[@]}" "$script" "$@"
fi
exec "${launcher[@]}" --module violet_ds.cli "$@"
