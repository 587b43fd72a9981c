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

import atexit
import contextlib
import faulthandler
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from violet_ds import errors
from violet_ds.data.loaders import reading_datasets
from violet_ds.errors import UserError, is_user_error, message_of

from .preflight import bad_sample_totals


T = TypeVar("T")

# seconds given to tearing down a process group before giving up on it (a peer may be gone)
ABORT_GRACE_S = 5.0
# seconds a loader's orderly worker shutdown may take before its workers are killed
WORKER_STOP_GRACE_S = 5.0
# seconds the main thread gets to leave a stalled batch wait (after its workers were killed) before the
# process ends without it (a wait stuck inside C code never returns to Python)
STALL_EXIT_GRACE_S = 30.0


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

    if isinstance(error, KeyboardInterrupt) and not errors.debug_enabled():
        # Ctrl-C: one line (none after a run that saved on it and logged so), never a traceback
        if not isinstance(error, errors.Interrupted):
            stream.write(f"{prefix} interrupted{': ' + str(error) if str(error) else ''}\n")
            stream.flush()
        return
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
        # os._exit skips the exit hooks, the one that stops DataLoader workers included
        stop_loader_workers()
        os._exit(code)
    else:
        destroy_process_group()


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` for DataLoaders: a worker ignores SIGTERM/SIGUSR1/SIGINT and leaves stopping to its parent.

    SLURM signals every process of a job step, DataLoader workers included, and PyTorch's worker
    handler re-raises a SIGTERM that does not come from the parent: the worker dies, the main process
    raises "DataLoader worker ... is killed by signal: Terminated" in the middle of the step, and the
    preemption checkpoint is never written. Ctrl-C reaches every process of the terminal's foreground
    group, and a worker ends on SIGINT, while its parent finishes the step and saves. An ignoring worker
    keeps serving batches until the trainer has saved; it still exits when the loader shuts down and
    when its parent dies (PyTorch's watchdog), and a failing or stalled loader kills it
    (`stop_loader_workers`).
    """
    numbers = _preemption_signals()
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)
    # the parent starts workers with these signals blocked (PreemptionSafeLoader); now that they are
    # ignored, a signal that arrived meanwhile is dropped on unblocking
    if numbers and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, numbers)


def _preemption_signals() -> list:
    names = ("SIGTERM", "SIGUSR1", "SIGINT")
    return [number for number in (getattr(signal, name, None) for name in names) if number is not None]


# ----------------------------------------------------------------------------------------- loader failures
class LoaderError(UserError):
    """A DataLoader worker failed or the loader stalled; the message names the sample (or the option)."""


# the multiprocess iterators whose workers may still run: killed at exit and by rank_guard's hard exit
_LIVE_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_EXIT_HOOK: list = []
# sent to the main thread when its wait for a batch stalled: a real signal interrupts a blocking call, and
# its default action is to ignore it, so one that arrives after the wait ended does nothing
STALL_SIGNAL = getattr(signal, "SIGURG", None)


def _kill_processes(processes: list) -> None:
    for process in processes:
        with contextlib.suppress(Exception):
            if process.is_alive():
                process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(1.0)


def _forget_worker_pids(iterator: Any) -> None:
    """Take the iterator's workers off PyTorch's SIGCHLD check (a killed worker must not raise in the main thread)."""
    if getattr(iterator, "_worker_pids_set", False):
        with contextlib.suppress(Exception):
            signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False


def stop_loader_workers(iterator: Any = None, orderly: bool = False) -> None:
    """Stop the worker processes of a DataLoader iterator (None: of every live one of this process).

    Workers ignore SIGTERM (`ignore_preemption_signals`), so multiprocessing's exit-time terminate +
    join would wait for them forever. `orderly`: PyTorch's own shutdown first (pin-memory thread,
    then the workers), bounded by `WORKER_STOP_GRACE_S`; whatever still runs then gets SIGKILL.
    """
    for live in [iterator] if iterator is not None else list(_LIVE_ITERATORS):
        workers = list(getattr(live, "_workers", None) or [])
        shutdown = getattr(live, "_shutdown_workers", None)
        if orderly and shutdown is not None:
            _run_bounded(shutdown, WORKER_STOP_GRACE_S)
        _forget_worker_pids(live)
        _kill_processes(workers)
        _LIVE_ITERATORS.discard(live)


def _track(iterator: Any) -> None:
    if not _EXIT_HOOK:
        # registered after multiprocessing's and PyTorch's exit hooks, so it runs before them (last in, first out)
        atexit.register(stop_loader_workers)
        _EXIT_HOOK.append(True)
    _LIVE_ITERATORS.add(iterator)


def _qualified_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"


def worker_error_message(error: BaseException) -> tuple:
    """(one-line message, worker number or None) of an exception PyTorch re-raised from a DataLoader worker.

    PyTorch re-raises the worker's exception type with "Caught X in DataLoader worker process N" and the
    worker's whole traceback as its message; the message the dataset wrote is the traceback's last entry.
    """
    text = message_of(error)
    found = re.search(r"in DataLoader worker process (\d+)", text)
    if found is None:
        return " ".join(text.split()), None
    marker = f"\n{_qualified_name(type(error))}: "
    at = text.rfind(marker)
    if at >= 0:
        message = text[at + len(marker):]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        message = lines[-1].split(": ", 1)[-1] if lines else type(error).__name__
    return " ".join(message.split()), int(found.group(1))


def _sample_report(dataset: Any) -> str:
    """"; samples read so far: N, skipped as bad: M" (over this process and its workers), or "" for a
    dataset that does not count them."""
    try:
        if not reading_datasets(dataset):
            return ""
        totals = bad_sample_totals({"data": dataset}, None)
    except Exception:  # noqa: BLE001 - the report only adds to the message
        return ""
    return f"; samples read so far: {totals['seen']}, skipped as bad: {totals['bad']}"


def _skips_bad_samples(dataset: Any) -> bool:
    return any(part.max_bad_fraction > 0 for part in reading_datasets(dataset))


class _StallInterrupt(Exception):
    """Raised in the main thread (through STALL_SIGNAL) when its wait for a batch stalled."""


class _GuardedIterator:
    """A DataLoader iterator whose failure or stall stops its workers and raises a one-line `LoaderError`."""

    def __init__(self, loader: DataLoader, inner: Any, stall_s: float):
        self._loader, self._inner, self._stall_s = loader, inner, stall_s
        self._waiting_since: Optional[float] = None
        self._stalled = False
        self._done = threading.Event()
        on_main = threading.current_thread() is threading.main_thread()
        self._main = threading.get_ident() if on_main else None
        if stall_s > 0:
            watchdog = threading.Thread(target=_watch_stalls, args=(weakref.ref(self), self._done, stall_s),
                                        name="violet-ds-loader-watchdog", daemon=True)
            watchdog.start()
            weakref.finalize(self, self._done.set)

    def __iter__(self) -> "_GuardedIterator":
        return self

    def __len__(self) -> int:
        return len(self._inner)

    def __next__(self) -> Any:
        previous = None
        if self._stall_s > 0 and STALL_SIGNAL is not None and threading.get_ident() == self._main:
            previous = signal.signal(STALL_SIGNAL, self._on_stall_signal)
        self._waiting_since = time.monotonic()
        try:
            batch = next(self._inner)
        except BaseException as error:  # noqa: BLE001 - every way out of a wait stops the workers
            self._leave_wait(previous)
            self._done.set()
            if isinstance(error, StopIteration):
                raise
            failure = self._failure(error)
            if failure is error:
                raise
            raise failure from error
        self._leave_wait(previous)
        return batch

    def _leave_wait(self, previous: Any) -> None:
        self._waiting_since = None
        if previous is not None:
            signal.signal(STALL_SIGNAL, previous)

    def _on_stall_signal(self, number, frame) -> None:
        if self._stalled and self._waiting_since is not None:
            raise _StallInterrupt()

    def _failure(self, error: BaseException) -> BaseException:
        """Stop the workers; the error to raise in place of `error`."""
        multiprocess = hasattr(self._inner, "_workers")
        if multiprocess:
            stop_loader_workers(self._inner, orderly=not self._stalled)
        if self._stalled:
            return LoaderError(self._stall_message())
        if not isinstance(error, Exception) or not is_user_error(error):
            return error  # KeyboardInterrupt, or a bug whose traceback (the worker's) is the information
        message, worker = worker_error_message(error)
        where = f"data loader worker {worker}" if worker is not None else "data loader"
        report = _sample_report(self._loader.dataset)
        hint = ""
        if type(error).__name__ in ("FrameDecodeError", "TSVError", "MissingVideoError") and \
                not _skips_bad_samples(self._loader.dataset):
            hint = ("; `violet-ds validate-tsv --tsv FILE --decode true` checks every frame of a TSV, and "
                    "data.max_bad_fraction > 0 skips unreadable samples")
        stopped = f"{len(self._inner._workers)} worker(s) stopped" if multiprocess else "loading in the main process"
        return LoaderError(f"{where}: {message} ({stopped}{report}){hint}")

    def _stall_message(self) -> str:
        workers = getattr(self._inner, "_workers", None)
        how = f"{len(workers)} worker(s) stopped" if workers else "loading in the main process"
        report = _sample_report(self._loader.dataset)
        return (f"data loader: no batch for {self._stall_s:g} s ({how}{report}): reading a sample is stuck "
                "(e.g. on a hung file system) or far too slow; raise data.loader_timeout_s, or set it to 0 to wait "
                "forever")

    def _check_stall(self) -> bool:
        """In the watchdog thread: True (and the main thread stopped) once a wait exceeded the limit."""
        since = self._waiting_since
        if since is None or time.monotonic() - since < self._stall_s:
            return False
        self._stalled = True
        # stuck workers cannot take part in an orderly shutdown; PyTorch's own check then fails the wait
        if hasattr(self._inner, "_workers"):
            stop_loader_workers(self._inner)
        if self._main is not None and STALL_SIGNAL is not None:
            with contextlib.suppress(Exception):
                signal.pthread_kill(self._main, STALL_SIGNAL)
        deadline = time.monotonic() + STALL_EXIT_GRACE_S
        while time.monotonic() < deadline:
            if self._waiting_since is None:
                return True
            time.sleep(0.1)
        # the wait is stuck inside C code and never returns to Python: end the process from here
        with contextlib.suppress(Exception):
            sys.stderr.write(f"violet-ds: error: {self._stall_message()}\n")
            sys.stderr.flush()
        stop_loader_workers()
        os._exit(1)


def _watch_stalls(ref: "weakref.ref[_GuardedIterator]", done: threading.Event, stall_s: float) -> None:
    poll = min(1.0, stall_s / 4)
    while not done.wait(poll):
        iterator = ref()
        if iterator is None or iterator._check_stall():
            return
        del iterator


class PreemptionSafeLoader(DataLoader):
    """A DataLoader whose workers never die of a preemption signal, not even while they start, and whose
    failures end the run cleanly.

    `ignore_preemption_signals` runs in a worker only after the worker process exists; a SIGTERM that
    SLURM sends in between (every epoch starts new workers) killed the worker and the run died without
    its preemption checkpoint (seen in the SIGTERM test under load). The parent therefore blocks the
    signals while it starts workers: a child inherits the blocked mask (across fork and exec), ignores
    the signals in `worker_init_fn`, then unblocks; the parent unblocks right after and receives any
    pending signal through its own handler (which saves and stops).

    An error in a worker stops the workers (PyTorch's shutdown, then SIGKILL: they ignore SIGTERM) and
    raises `LoaderError`, one line naming the sample, with the bad-sample counts; with `stall_s` > 0 a
    wait of more than `stall_s` seconds for one batch (time spent training is not counted) does the
    same (a watchdog thread). At interpreter exit the workers of every live iterator are killed before
    multiprocessing's own exit hook would SIGTERM (ignored) and join them forever.
    """

    def __init__(self, *args: Any, stall_s: float = 0.0, **kwargs: Any):
        self.stall_s = float(stall_s)
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        inner = self._start_iterator()
        if self.persistent_workers:
            return inner  # DataLoader reuses (`_reset`) a persistent iterator; PyTorch stops those at exit
        if self.num_workers > 0:
            _track(inner)
        return _GuardedIterator(self, inner, self.stall_s)

    def _start_iterator(self):
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
