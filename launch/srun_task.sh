#!/usr/bin/env bash
# One SLURM task of a violet_ds job (what `srun` starts on each rank): runs the command given as
# arguments and, when SLURM signals the step (preemption, `--signal=TERM@...`, `scancel --signal=TERM`),
# appends a line to $VIOLET_DS_PREEMPT_MARKER so the batch script knows to requeue the job.
# The training process receives the same signal from SLURM directly (the step's whole process tree is
# signalled): it saves a checkpoint at the next step boundary and exits; nothing is forwarded from here.
# Before that it picks this host's network interface towards the master (launch/network.sh) and logs it.
# When the command fails before SLURM signalled this task (an error, an OOM kill, a lost peer), it appends
# a FAILED line naming the task and host instead: the batch script then fails the job, no requeue.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/network.sh
source "$here/network.sh"
violet_ds_fail_fast_env
master="${MASTER_ADDR:-${VIOLET_DS_MASTER_ADDR:-}}"
if [ -z "$master" ]; then
    master="$(scontrol show hostnames "${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}" 2>/dev/null | head -n 1)"
fi
if [ "${VIOLET_DS_TASK_IGNORE_TERM:-0}" = 1 ]; then
    who="node ${SLURM_NODEID:-?} launcher"
else
    who="rank ${SLURM_PROCID:-?}"
fi
violet_ds_network_env "${master:-127.0.0.1}" "$who"

signalled=0
ever_signalled=0
note() {
    signalled=1
    ever_signalled=1
    if [ -n "${VIOLET_DS_PREEMPT_MARKER:-}" ]; then
        echo "$1 $(date -u +%FT%TZ) rank ${SLURM_PROCID:-?} host $(hostname -s)" >>"$VIOLET_DS_PREEMPT_MARKER"
    fi
}
trap 'note TERM' TERM
trap 'note USR1' USR1

if [ "${VIOLET_DS_TASK_IGNORE_TERM:-0}" = 1 ]; then
    # the DeepSpeed runner dies on SIGTERM at once and this task would end, taking the ranks with it
    # mid-save; with TERM ignored it stays, while DeepSpeed's per-node launch.py (which installs its own
    # handler) forwards the signal to the ranks and waits for them
    (trap '' TERM; exec "$@") &
else
    "$@" &
fi
child=$!
wait "$child"
status=$?
# a trapped signal interrupts `wait`; wait again for the real exit status (bash keeps it once reaped)
while [ "$signalled" = 1 ]; do
    signalled=0
    wait "$child"
    status=$?
done
if [ "$status" != 0 ] && [ "$ever_signalled" = 0 ] && [ -n "${VIOLET_DS_PREEMPT_MARKER:-}" ]; then
    # this task failed on its own (error, OOM kill, lost peer) before SLURM signalled the step: the batch
    # script must not take the TERM that srun --kill-on-bad-exit then sends the other tasks for a preemption
    how="exit status $status"
    [ "$status" -le 128 ] || how="$how (killed by signal $((status - 128)))"
    echo "FAILED $(date -u +%FT%TZ) $who on host $(hostname -s): $how" >>"$VIOLET_DS_PREEMPT_MARKER"
fi
exit "$status"
