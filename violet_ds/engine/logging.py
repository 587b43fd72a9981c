"""Run-directory logging: TensorBoard scalars/images/text, `metrics.jsonl`, `log.txt`, training progress.

Only rank 0 writes files; other ranks get a logger whose writers are no-ops, so callers never branch
on the rank. Warnings of the other ranks (their `violet_ds.*` loggers: skipped bad samples, ...) still
reach their stderr, prefixed with the rank.

Progress: a tqdm bar only when stderr is a terminal (and `run.progress`); on every other stderr (log
files, SLURM, the DeepSpeed launcher's pipes) plain step lines with loss, lr, samples/s and ETA at
least every 5% of the run, so a log file never fills with carriage-return records. `log.txt` gets the
step lines in both cases.

Library output: what DeepSpeed and torch print while violet_ds drives them (DeepSpeed's logger, op builds,
`print` calls, C++ output on file descriptor 1, zero_to_fp32's reports, torch's `No CUDA runtime is found`)
goes to the `violet_ds.library` logger (`library_output`, `capture_library_logs`): DEBUG records in log.txt,
never on the console; their warnings and errors keep their level and reach stderr as well. Before a run's
log exists (distributed set-up) the records wait in a backlog that the next `RunLogger` writes to log.txt.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import datetime
import io
import json
import logging
import math
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.auto import tqdm as tqdm_auto

from violet_ds.progress import DATE_FORMAT, STEP_LINES, format_duration, progress, stderr_is_terminal

from .distributed import World


LOGGER_NAME = "violet_ds"
# libraries' output (DeepSpeed, torch C++ extensions, stdout of library calls): log.txt only, as DEBUG
LIBRARY_LOGGER = "violet_ds.library"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# library loggers whose records go to LIBRARY_LOGGER, with the label they get there and the warnings that
# are only chatter (torch warns on every CPU-only machine that has a CUDA toolkit directory)
LIBRARY_SOURCES = {
    "DeepSpeed": ("deepspeed", ()),
    "torch.utils.cpp_extension": ("torch.cpp_extension", ("No CUDA runtime is found",)),
}
# what DeepSpeed's engine writes to its monitors that the trainer logs under its own name (train/lr, ...)
DEEPSPEED_DUPLICATES = frozenset({"Train/Samples/lr", "Train/Samples/loss_scale"})

def log_format(world: World) -> logging.Formatter:
    """`2026-11-27 09:49:49 INFO message`; `[rank r on host]` after the time when several ranks run."""
    rank = f"[rank {world.rank} on {socket.gethostname()}] " if world.distributed else ""
    return logging.Formatter(f"%(asctime)s {rank}%(levelname)s %(message)s", DATE_FORMAT)


class _Console(logging.StreamHandler):
    """stderr; while a progress bar is active (`bar_active`) it drops step lines (the bar shows the same
    numbers) and prints other records above the bar instead of through it."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.bar_active = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.bar_active and getattr(record, "step_line", False):
            return False
        if record.name == LIBRARY_LOGGER and record.levelno < logging.WARNING:
            return False  # library chatter: log.txt only
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        if not self.bar_active:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class _Backlog(logging.Handler):
    """Library records while no run log is open: kept for the next `RunLogger` (its log.txt), and
    warnings and errors printed to stderr right away."""

    def __init__(self, size: int = 2000):
        super().__init__()
        self.records: collections.deque = collections.deque(maxlen=size)
        self.setFormatter(log_format(World()))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno >= logging.WARNING:
            try:
                sys.stderr.write(self.format(record) + "\n")
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - logging must not raise
                self.handleError(record)

    def take(self) -> list:
        records = list(self.records)
        self.records.clear()
        return records


_BACKLOG = _Backlog()
# RunLoggers open in this process (the backlog collects while there are none)
_OPEN_RUN_LOGS = [0]


class _ToLibraryLog(logging.Filter):
    """Put on a library's logger: its records go to `violet_ds.library` instead of the library's own
    handlers; records below WARNING and the `chatter` warnings become DEBUG there."""

    def __init__(self, source: str, chatter: tuple = ()):
        super().__init__()
        self.source, self.chatter = source, chatter

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = record.levelno < logging.WARNING or (bool(self.chatter) and str(record.msg).startswith(self.chatter))
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed library record is still shown
            message = str(record.msg)
        library_log(logging.DEBUG if quiet else record.levelno, self.source, message, record.exc_info)
        return False


def _library_logger() -> logging.Logger:
    log = logging.getLogger(LIBRARY_LOGGER)
    if not getattr(log, "_violet_ds_ready", False):
        # its own handlers only (a RunLogger's, or the backlog): a root handler configured by an application
        # must not print library chatter either
        log.propagate = False
        log.setLevel(logging.DEBUG)
        log.addHandler(_BACKLOG)
        log._violet_ds_ready = True  # type: ignore[attr-defined]
    return log


def library_log(level: int, source: str, message: str, exc_info: Any = None) -> None:
    """One record of library output (`[source] message`) on the `violet_ds.library` logger."""
    log = _library_logger()
    if log.isEnabledFor(level):
        log.log(level, "[%s] %s", source, message, exc_info=exc_info)


def capture_library_logs() -> None:
    """Route DeepSpeed's logger and torch's C++-extension logger to `violet_ds.library` (idempotent). Works
    before the libraries are imported: they take the same logger objects by name."""
    _library_logger()
    for name, (source, chatter) in LIBRARY_SOURCES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToLibraryLog) for f in logger.filters):
            logger.addFilter(_ToLibraryLog(source, chatter))


def _flush_c_stdout() -> None:
    """Flush the C library's stdout buffer (C++ extensions print through it)."""
    try:
        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - no libc to flush (another platform): nothing was buffered there
        pass


@contextlib.contextmanager
def library_output(source: str = "deepspeed"):
    """Library calls in the block print to the run's log instead of stdout.

    Python's `print` and anything written to file descriptor 1 (a C++ extension build, C++ `std::cout`)
    become DEBUG records `[source] line` of `violet_ds.library` (log.txt), once the block ends. When the
    block raises, the captured lines are logged as warnings instead: they usually explain the failure.
    Also routes the library loggers there (`capture_library_logs`).
    """
    capture_library_logs()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    _flush_c_stdout()
    spool = tempfile.TemporaryFile()
    try:
        saved = os.dup(1)
        os.dup2(spool.fileno(), 1)
    except OSError:  # no file descriptor 1 (a daemon): Python-level output is still captured
        saved = None
    text = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stdout(text):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        _flush_c_stdout()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        spool.seek(0)
        captured = spool.read().decode(errors="replace") + text.getvalue()
        spool.close()
        for line in captured.splitlines():
            if line.strip():
                library_log(logging.WARNING if failed else logging.DEBUG, source, line.rstrip())


@contextlib.contextmanager
def library_progress(module: Any, label: str, attribute: str = "tqdm"):
    """While the block runs, a library module's `tqdm` (the class, or the tqdm module itself) draws through
    `violet_ds.progress.progress`: a bar on terminals, dated lines elsewhere; `label` names a bar that
    the library leaves without a description."""
    def bar(iterable=None, *args: Any, desc: Optional[str] = None, total: Optional[int] = None, unit: str = "it",
            initial: int = 0, leave: bool = True, disable: Optional[bool] = False, **options: Any):
        # tqdm's other options (file, ncols, position, ...) concern the drawing, which progress() owns
        return progress(iterable, total=total, desc=desc or label, unit=unit, initial=initial, leave=leave,
                        enabled=disable is not True)

    original = getattr(module, attribute)
    setattr(module, attribute, bar if callable(original) else SimpleNamespace(tqdm=bar))
    try:
        yield
    finally:
        setattr(module, attribute, original)


class OwnScalarsMonitor:
    """DeepSpeed's monitor (the wandb / csv_monitor / comet / tensorboard blocks of the ds_config) without
    DeepSpeed's copies of scalars the trainer logs itself (`DEEPSPEED_DUPLICATES`): the monitors then hold
    TensorBoard's names. Everything else passes through to the wrapped monitor."""

    def __init__(self, monitor: Any):
        self.inner = monitor

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def write_events(self, events: list) -> None:
        kept = [event for event in events if event[0] not in DEEPSPEED_DUPLICATES]
        if kept:
            self.inner.write_events(kept)


def utc_timestamp() -> str:
    """Now as ISO-8601 UTC with milliseconds: `2026-12-06T08:27:27.123Z` (metrics.jsonl's `time`)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class RunLogger:
    """TensorBoard + metrics.jsonl + log.txt of one run directory (rank 0 only)."""

    def __init__(self, run_dir: Path, world: World, *, purge_step: Optional[int] = None, level: str = "info",
                 config_text: Optional[str] = None):
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.run_dir = Path(run_dir)
        self.world = world
        self.config_text = config_text
        self.log = logging.getLogger(LOGGER_NAME)
        self.log.setLevel(LEVELS[level])
        self.log.propagate = False
        # DeepSpeed's info lines reach log.txt (as library DEBUG records) at the info and debug levels;
        # its own debug output stays off
        self._deepspeed_level = logging.getLogger("DeepSpeed").level
        logging.getLogger("DeepSpeed").setLevel(max(LEVELS[level], logging.INFO))
        capture_library_logs()
        self.library = _library_logger()
        self.library.removeHandler(_BACKLOG)
        backlog = _BACKLOG.take()
        _OPEN_RUN_LOGS[0] += 1
        self._open = True
        # library chatter is kept in log.txt unless the run asked for warnings and errors only
        self.library.setLevel(logging.DEBUG if LEVELS[level] <= logging.INFO else LEVELS[level])
        self._handlers: list[logging.Handler] = []
        self.console = _Console()
        self.writer = None
        self.monitor = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._captured_warnings = False
        if not world.is_main:
            # other ranks: their warnings and errors on their own stderr, marked with the rank
            console = logging.StreamHandler(sys.stderr)
            console.setLevel(max(logging.WARNING, LEVELS[level]))
            console.setFormatter(log_format(world))
            self._add_handler(console)
            self._capture_python_warnings()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_file = logging.FileHandler(self.run_dir / "log.txt")
        for handler in (log_file, self.console):
            handler.setFormatter(log_format(world))
            self._add_handler(handler)
        # what libraries said before the log existed (distributed set-up); its warnings were shown then
        for record in backlog:
            if record.levelno >= self.library.level:
                log_file.handle(record)
        self._capture_python_warnings()
        # purge_step drops events past the resumed step that an interrupted run had already written
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        if config_text:
            self.text("config", config_text, step=(purge_step - 1) if purge_step else 0)

    def _add_handler(self, handler: logging.Handler) -> None:
        """A handler of violet_ds's own records and of the library records."""
        self.log.addHandler(handler)
        self.library.addHandler(handler)
        self._handlers.append(handler)

    def _capture_python_warnings(self) -> None:
        """With several ranks, Python warnings (`warnings.warn`) go through the same handlers, so that
        each one names its rank (and rank 0's also land in log.txt)."""
        if not self.world.distributed:
            return
        logging.captureWarnings(True)
        self._captured_warnings = True
        py_warnings = logging.getLogger("py.warnings")
        py_warnings.propagate = False
        for handler in self._handlers:
            py_warnings.addHandler(handler)

    def info(self, message: str) -> None:
        if self.world.is_main:
            self.log.info(message)

    def warning(self, message: str, all_ranks: bool = False) -> None:
        """A warning from rank 0, or (`all_ranks`: a rank-local problem) from every rank that calls it."""
        if self.world.is_main or all_ranks:
            self.log.warning(message)

    def debug(self, message: str) -> None:
        if self.world.is_main:
            self.log.debug(message)

    def step_line(self, message: str) -> None:
        """A training progress line: always in log.txt, on the console unless a progress bar shows it."""
        if self.world.is_main:
            self.log.info(message, extra={"step_line": True})

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Preformatted text (e.g. the resolved config) in TensorBoard's Text tab."""
        if self.writer is None:
            return
        # TensorBoard renders markdown: four leading spaces keep YAML as a verbatim block
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def attach_monitor(self, monitor: Any) -> None:
        """Also send scalars to DeepSpeed's monitors (`wandb`, `csv_monitor`, `comet` blocks of the
        ds_config) when one is enabled: they then get every scalar of TensorBoard, under its names
        (`deepspeed_engine.initialize` wraps the engine's monitor in `OwnScalarsMonitor`, which drops
        DeepSpeed's duplicates). A wandb run also gets the resolved configuration (config.yaml as a dict)."""
        if not (self.world.is_main and getattr(monitor, "enabled", False)):
            return
        self.monitor = monitor
        if getattr(monitor, "wandb_monitor", None) is not None and self.config_text:
            import wandb  # optional dependency (the [wandb] extra): imported only when a wandb monitor is on

            if wandb.run is not None:
                wandb.run.config.update(yaml.safe_load(self.config_text) or {}, allow_val_change=True)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "", samples: Optional[int] = None) -> None:
        """TensorBoard scalars at `step`; DeepSpeed's monitors get them at `samples` (their x axis, as
        DeepSpeed's own Train/Samples/* events), or at `step` when not given."""
        if self.writer is None:
            return
        events = []
        for key, value in values.items():
            number = _as_float(value)
            if number is not None and math.isfinite(number):
                self.writer.add_scalar(f"{prefix}{key}", number, step)
                events.append((f"{prefix}{key}", number, step if samples is None else samples))
        if self.monitor is not None and events:
            self.monitor.write_events(events)

    def images(self, step: int, images: Mapping[str, torch.Tensor], prefix: str = "images/") -> None:
        if self.writer is None:
            return
        for key, image in images.items():
            image = image.detach().float().cpu()
            if image.dim() != 3:
                raise ValueError(f"image {key!r} must be (3, H, W), got shape {tuple(image.shape)}")
            self.writer.add_image(f"{prefix}{key}", image.clamp(0, 1), step)

    def record(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl, with the wall-clock `time` it was written (ISO-8601 UTC)."""
        if not self.world.is_main:
            return
        clean = {}
        for key, value in record.items():
            number = _as_float(value)
            clean[key] = number if number is not None and not isinstance(value, int) else value
        clean.setdefault("time", utc_timestamp())
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(clean) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metrics.jsonl records of steps > after_step (a resumed run recomputes them)."""
        if not self.world.is_main or not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= after_step]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.monitor is not None and getattr(self.monitor, "wandb_monitor", None) is not None:
            # DeepSpeed starts the wandb run but never finishes it; unfinished offline runs lack their summary
            import wandb  # optional dependency, see above

            wandb.finish()
        self.monitor = None
        if self._captured_warnings:
            logging.captureWarnings(False)
            self._captured_warnings = False
        for handler in self._handlers:
            self.log.removeHandler(handler)
            self.library.removeHandler(handler)
            logging.getLogger("py.warnings").removeHandler(handler)
            handler.close()
        self._handlers = []
        if self._open:
            self._open = False
            _OPEN_RUN_LOGS[0] -= 1
            if _OPEN_RUN_LOGS[0] == 0:
                self.library.setLevel(logging.DEBUG)
                self.library.addHandler(_BACKLOG)
        logging.getLogger("DeepSpeed").setLevel(self._deepspeed_level)


def line_interval(total: int, log_every: int, lines: int = STEP_LINES) -> int:
    """Optimizer steps between step lines: at least `lines` lines per run, on log windows when they allow."""
    budget = max(1, total // lines)
    return log_every * (budget // log_every) if log_every <= budget else budget


class TrainProgress:
    """Progress of the training loop on rank 0.

    On a terminal with `enabled`: a tqdm bar (loss and lr in its postfix) and step lines into log.txt
    only. Otherwise: step lines on stderr and in log.txt, every `interval` steps (at least one per 5%
    of the run) and at the last step. The loop asks `line_due(step)` to aggregate its loss window at
    those steps too, then calls `report`.
    """

    def __init__(self, total: int, initial: int, world: World, logger: "RunLogger", *, enabled: bool = True,
                 log_every: int = 1, terminal: Optional[bool] = None, desc: str = "train"):
        self.total, self.initial, self.world, self.logger = total, initial, world, logger
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self.interval = line_interval(total, max(1, log_every))
        self.started = time.time()
        self.bar = None
        if enabled and self.terminal and world.is_main:
            self.bar = tqdm_auto(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
        logger.console.bar_active = self.bar is not None

    def line_due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total

    def update(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def eta_s(self, step: int) -> float:
        done = step - self.initial
        if done <= 0:
            return math.nan
        return (time.time() - self.started) / done * (self.total - step)

    def report(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        """The numbers of the window that ended at `step`; a step line when one is due."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if not self.line_due(step):
            return
        elapsed = time.time() - self.started
        self.logger.step_line(
            f"step {step}/{self.total} ({100.0 * step / max(1, self.total):.0f}%) loss {loss:.4f} lr {lr:.2e} "
            f"{samples_per_s:.1f} samples/s elapsed {format_duration(elapsed)} ETA {format_duration(self.eta_s(step))}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.logger.console.bar_active = False


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
