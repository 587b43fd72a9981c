#!/usr/bin/env bash
# One SLURM task of a violet_ds job (what `srun` starts on each rank): runs the command given as
# arguments and, when SLURM signals the step (preemption, `--signal=TERM@...`, `scancel --signal=TERM`),
# appends a line to $VIOLET_DS_PREEMPT_MARKER so the batch script knows to requeue the job.
# The training process receives the same signal from SLURM directly (the step's whole process tree is
# signalled): it saves a checkpoint at the next step boundary and exits; nothing is forwarded from here.
set -u

signalled=0
note() {
    signalled=1
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
exit "$status"
