# Shared body of launch/slurm_*.sbatch (sourced, not run): log the job, resolve the run config, start
# the ranks with srun (or the DeepSpeed launcher), and requeue the job when it was preempted.
#
# Environment knobs (all optional):
#   LAUNCHER=srun        one srun task per GPU; rank variables come from violet_ds.engine.distributed
#   LAUNCHER=deepspeed   one srun task per node running the DeepSpeed launcher over a hostfile built
#                        from the allocation (launch/make_hostfile.sh); `--no_ssh`, so no pdsh/ssh needed
#   VIOLET_DS_ROOT       repository checkout (default: the directory sbatch was called from)
#   VIOLET_DS_WORKDIR    directory the run starts in, against which relative paths of the config
#                        resolve (default: the job's working directory, i.e. sbatch --chdir or the
#                        directory sbatch was called from)
#   VIOLET_DS_PYTHON     interpreter with violet_ds installed (default: python3)
#   VIOLET_DS_NO_REQUEUE=1  never requeue (e.g. for debugging a preemption)
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME   kept when set; else every task picks its host's interface
#                        towards the master (launch/network.sh)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING (default 1), TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC (default 300)

violet_ds_log() { echo "[violet-ds slurm $(date -u +%FT%TZ)] $*"; }

violet_ds_slurm_run() {
    local command="$1"
    shift
    local root="${VIOLET_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
    local python="${VIOLET_DS_PYTHON:-python3}"
    # the job's working directory (sbatch --chdir, else where sbatch was called)
    local workdir="${VIOLET_DS_WORKDIR:-$PWD}"
    cd "$workdir" || { echo "cannot cd to $workdir" >&2; return 1; }
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    # DeepSpeed and torch threads: one rank per GPU must not oversubscribe the node's cores
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

    violet_ds_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
        "${SLURM_NNODES:-1} node(s) [${SLURM_JOB_NODELIST:-?}], ${SLURM_NTASKS:-1} task(s), launcher ${LAUNCHER:-srun}"

    # resume from the last checkpoint unless the user said otherwise: this is what makes a requeued job
    # continue where it stopped
    local args=("$@")
    case " ${args[*]} " in
        *" --run.resume"*) ;;
        *) args+=(--run.resume auto) ;;
    esac

    # resolve the configuration once, before any rank starts: a bad key fails here, in one line of log
    local resolved
    resolved="$(mktemp)"
    if ! "$python" -m violet_ds.cli "$command" "${args[@]}" --print_config >"$resolved"; then
        violet_ds_log "the configuration does not resolve (see above)"
        rm -f "$resolved"
        return 2
    fi
    local run_dir
    run_dir="$("$python" - "$resolved" <<'PY'
import sys
from pathlib import Path
import yaml
with open(sys.argv[1]) as handle:
    cfg = yaml.safe_load(handle) or {}
run = cfg.get("run") or {}
print(Path(run.get("output_dir") or "runs") / (run.get("name") or "run"))
PY
)" || { rm -f "$resolved"; return 2; }
    mkdir -p "$run_dir"
    cp "$resolved" "$run_dir/slurm-${SLURM_JOB_ID:-local}-${SLURM_RESTART_COUNT:-0}.yaml"
    violet_ds_log "run directory: $(cd "$run_dir" && pwd)"
    violet_ds_log "resolved configuration:"
    sed 's/^/    /' "$resolved"
    rm -f "$resolved"

    export VIOLET_DS_PREEMPT_MARKER="$(cd "$run_dir" && pwd)/.preempted-${SLURM_JOB_ID:-local}"
    rm -f "$VIOLET_DS_PREEMPT_MARKER"

    local task="$root/launch/srun_task.sh"
    local step=()
    # the address every rank meets at (the same function the ranks call); each task picks its network
    # interface towards it (launch/network.sh, logged by every task)
    local master_addr master_port
    read -r master_addr master_port < <("$python" -m violet_ds.engine.distributed master)
    export VIOLET_DS_MASTER_ADDR="$master_addr"
    # shellcheck source=launch/network.sh
    source "$root/launch/network.sh"
    violet_ds_fail_fast_env
    violet_ds_log "master $master_addr:$master_port; TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING" \
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=$TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"
    if [ "${LAUNCHER:-srun}" = deepspeed ]; then
        local hostfile="$(cd "$run_dir" && pwd)/hostfile-${SLURM_JOB_ID:-local}"
        bash "$root/launch/make_hostfile.sh" "$hostfile"
        violet_ds_log "DeepSpeed launcher: hostfile $hostfile ($(wc -l <"$hostfile") node(s)), master $master_addr:$master_port"
        export VIOLET_DS_TASK_IGNORE_TERM=1
        # one launcher per node; each learns its node rank from its own task's SLURM_NODEID
        step=(srun --kill-on-bad-exit=1 --nodes="${SLURM_NNODES:-1}" --ntasks="${SLURM_NNODES:-1}" --ntasks-per-node=1
              bash "$task" bash -c 'exec "$0" --node_rank="$SLURM_NODEID" "$@"'
              deepspeed --hostfile "$hostfile" --no_ssh --master_addr "$master_addr" --master_port "$master_port"
              --module violet_ds.cli "$command" "${args[@]}")
    else
        step=(srun --kill-on-bad-exit=1 bash "$task" "$python" -m violet_ds.cli "$command" "${args[@]}")
    fi
    violet_ds_log "starting: ${step[*]}"

    # a signal sent to the batch shell itself (`#SBATCH --signal=B:TERM@...`, `scancel --batch`) goes on
    # to the ranks through srun, which forwards it to every task
    local srun_pid
    "${step[@]}" &
    srun_pid=$!
    local forwarded=0
    trap 'forwarded=1; echo "TERM batch $(date -u +%FT%TZ)" >>"$VIOLET_DS_PREEMPT_MARKER"; kill -TERM "$srun_pid" 2>/dev/null' TERM
    trap 'forwarded=1; echo "USR1 batch $(date -u +%FT%TZ)" >>"$VIOLET_DS_PREEMPT_MARKER"; kill -TERM "$srun_pid" 2>/dev/null' USR1
    wait "$srun_pid"
    local status=$?
    while [ "$forwarded" = 1 ]; do
        forwarded=0
        wait "$srun_pid"
        status=$?
    done
    trap - TERM USR1
    violet_ds_log "ranks finished with exit status $status"

    # a task that failed by itself (srun_task.sh wrote FAILED) makes the job fail, even when the other tasks
    # were then signalled by srun --kill-on-bad-exit: that is no preemption, and a requeue would fail again
    local failed=""
    [ ! -f "$VIOLET_DS_PREEMPT_MARKER" ] || failed="$(grep '^FAILED ' "$VIOLET_DS_PREEMPT_MARKER" || true)"
    if [ -n "$failed" ]; then
        while read -r _ _ what; do
            violet_ds_log "lost $what"
        done <<<"$failed"
        violet_ds_log "the job failed (not a preemption, not requeued); resume it with --run.resume auto from the" \
            "last complete checkpoint in $run_dir/checkpoints"
        rm -f "$VIOLET_DS_PREEMPT_MARKER"
        [ "$status" != 0 ] || status=1
        return "$status"
    fi
    if [ -s "$VIOLET_DS_PREEMPT_MARKER" ]; then
        violet_ds_log "preempted: $(tr '\n' ';' <"$VIOLET_DS_PREEMPT_MARKER")"
        rm -f "$VIOLET_DS_PREEMPT_MARKER"
        if [ "${VIOLET_DS_NO_REQUEUE:-0}" != 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
            # log first: slurmctld may end this batch shell as soon as the requeue is accepted
            violet_ds_log "requeueing job $SLURM_JOB_ID: it resumes from the last checkpoint in $run_dir/checkpoints"
            if scontrol requeue "$SLURM_JOB_ID"; then
                return 0
            fi
            violet_ds_log "scontrol requeue failed (was the job submitted with --no-requeue?)"
        fi
    fi
    return "$status"
}
