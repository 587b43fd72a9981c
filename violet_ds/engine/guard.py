"""Make a failure on one rank end the whole job, loudly, instead of leaving the other ranks hanging.

The classic multi-rank hang: rank 3 raises inside the training step while ranks 0-2 sit in an
all-reduce waiting for it; Python unwinds rank 3, its interpreter then blocks on exit (non-daemon
threads of the communication backend, a DataLoader worker, an atexit hook) and the job burns its
allocation until the collective timeout, or forever. `rank_guard` closes that hole:

- on an exception in the guarded block, the failing rank prints the traceback prefixed with its
  rank and host, tries to abort its process group (bounded by a few seconds), and leaves with
  `os._exit(1)`, skipping every exit hook that could block. Its peers' next collective then fails
  fast (the connection is gone) or at the collective timeout set by `init_distributed`; they go
  through the same guard. Launchers stop the remaining ranks on the first non-zero exit (the
  DeepSpeed launcher does by itself, `srun` with `--kill-on-bad-exit=1`, torchrun by default).
- on normal completion the process group is destroyed, because a gloo group left for interpreter
  shutdown aborts the process intermittently ("terminate called without an active exception").
- a single process (WORLD_SIZE 1, with or without a 1-rank process group) leaves the group and
  re-raises as usual, so tests and notebooks see the ordinary exception.

Usage (the whole body of a command, after or around `init_distributed`):

    with rank_guard():
        ...
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Callable, Iterator, Optional, TypeVar

import torch
from torch.utils.data import DataLoader

T = TypeVar("T")

# seconds given to tearing down a process group before giving up on it (a peer may be gone)
ABORT_GRACE_S = 5.0


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _run_bounded(func: Callable[[], None], seconds: float) -> bool:
    """Run func in a daemon thread; True if it finished in time (a hung teardown must not block exit)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            func()
        except Exception as error:  # noqa: BLE001 - a failed teardown only matters for the message
            errors.append(error)

    thread = threading.Thread(target=target, name="violet-ds-pg-teardown", daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive() and not errors


def abort_process_group(grace_s: float = ABORT_GRACE_S) -> None:
    """Tear the default process group down without waiting for peers that may be dead or hung."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    abort = getattr(getattr(dist, "distributed_c10d", None), "_abort_process_group", None)
    if abort is not None and _run_bounded(abort, grace_s):
        return
    _run_bounded(dist.destroy_process_group, grace_s)


def destroy_process_group() -> None:
    """Normal end of a distributed run: leave the group so interpreter shutdown cannot abort."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        _run_bounded(dist.destroy_process_group, ABORT_GRACE_S)


def report_failure(error: BaseException, rank: int, world: int, stream=None) -> None:
    """Print the failing rank's traceback, every line prefixed so interleaved logs stay readable."""
    stream = stream or sys.stderr
    prefix = f"[violet-ds rank {rank}/{world} on {socket.gethostname()} pid {os.getpid()}]"
    from violet_ds import errors

    if errors.is_user_error(error) and not errors.debug_enabled():
        # the message names the file/key and what to do; the traceback only with --debug
        stream.write(f"{prefix} FAILED: {type(error).__name__}: {errors.message_of(error)}\n")
        stream.flush()
        return
    lines = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip("\n")
    body = "\n".join(f"{prefix} {line}" for line in lines.splitlines())
    stream.write(f"{prefix} FAILED: {type(error).__name__}: {error}\n{body}\n")
    stream.flush()


def _exit_code(error: BaseException) -> int:
    if isinstance(error, SystemExit):
        code = error.code
        if code is None:
            return 0
        return code if isinstance(code, int) else 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


@contextlib.contextmanager
def rank_guard(stream=None) -> Iterator[None]:
    """Context manager: an exception on any rank of a multi-rank job ends this process with exit code 1.

    `SystemExit(n)` keeps its code (0 passes through as a normal end). See the module docstring.
    """
    # `kill -USR2 <pid>` prints every thread's stack: the first thing one wants from a hung rank
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR2"):
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - every way out of a rank must be handled here
        code = _exit_code(error)
        rank, world = _rank_and_world()
        # a 1-rank group (DeepSpeed needs one even for a single process) has no peer to hang: the
        # ordinary exception is more useful there, e.g. to a test calling the command in-process
        if code == 0 or world <= 1:
            destroy_process_group()
            raise
        report_failure(error, rank, world, stream)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        abort_process_group()
        os._exit(code)
    else:
        destroy_process_group()


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` for DataLoaders: a worker ignores SIGTERM/SIGUSR1 and leaves stopping to its parent.

    SLURM signals every process of a job step, DataLoader workers included, and PyTorch's worker
    handler re-raises a SIGTERM that does not come from the parent: the worker dies, the main process
    raises "DataLoader worker ... is killed by signal: Terminated" in the middle of the step, and the
    preemption checkpoint is never written. An ignoring worker keeps serving batches until the trainer
    has saved; it still exits when the loader shuts down and when its parent dies (PyTorch's watchdog).
    """
    numbers = _preemption_signals()
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)
    # the parent starts workers with these signals blocked (PreemptionSafeLoader); now that they are
    # ignored, a signal that arrived meanwhile is dropped on unblocking
    if numbers and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, numbers)


def _preemption_signals() -> list:
    return [number for number in (getattr(signal, name, None) for name in ("SIGTERM", "SIGUSR1")) if number is not None]


class PreemptionSafeLoader(DataLoader):
    """A DataLoader whose workers never die of a preemption signal, not even while they start.

    `ignore_preemption_signals` runs in a worker only after the worker process exists; a SIGTERM that
    SLURM sends in between (every epoch starts new workers) killed the worker and the run died without
    its preemption checkpoint (seen in the SIGTERM test under load). The parent therefore blocks the
    signals while it starts workers: a child inherits the blocked mask (across fork and exec), ignores
    the signals in `worker_init_fn`, then unblocks; the parent unblocks right after and receives any
    pending signal through its own handler (which saves and stops).
    """

    def _get_iterator(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super()._get_iterator()
        numbers = _preemption_signals()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_guarded(func: Callable[..., T], *args, **kwargs) -> Optional[T]:
    """Call func(*args, **kwargs) under `rank_guard` (the one call a command's body needs)."""
    with rank_guard():
        return func(*args, **kwargs)
