#!/usr/bin/env bash
# Write a DeepSpeed hostfile for the current SLURM allocation: one `host slots=N` line per node.
#   launch/make_hostfile.sh [OUT] [SLOTS]
# OUT defaults to stdout; SLOTS (processes per node) defaults to the GPUs SLURM gave each node, else
# the tasks per node of the allocation, else 1.
set -euo pipefail
out="${1:--}"
slots="${2:-${SLURM_GPUS_ON_NODE:-}}"
if [ -z "$slots" ] || [ "$slots" = 0 ]; then
    # "2(x3)" -> 2: every node of a homogeneous allocation has the same count
    slots="$(echo "${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}" | sed -E 's/[(,].*//')"
fi
nodelist="${SLURM_JOB_NODELIST:?make_hostfile.sh runs inside a SLURM allocation (SLURM_JOB_NODELIST is unset)}"
hosts="$(scontrol show hostnames "$nodelist")"
[ -n "$hosts" ] || { echo "make_hostfile.sh: scontrol expanded $nodelist to no hosts" >&2; exit 1; }
lines="$(printf '%s\n' $hosts | sed "s/\$/ slots=$slots/")"
if [ "$out" = - ]; then
    echo "$lines"
else
    echo "$lines" >"$out"
fi
