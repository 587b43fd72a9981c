"""Run-directory logging: TensorBoard scalars/images/text, `metrics.jsonl`, `log.txt`, training progress.

Only rank 0 writes files; other ranks get a logger whose writers are no-ops, so callers never branch
on the rank. Warnings of the other ranks (their `violet_ds.*` loggers: skipped bad samples, ...) still
reach their stderr, prefixed with the rank.

Progress: a tqdm bar only when stderr is a terminal (and `run.progress`); on every other stderr (log
files, SLURM, the DeepSpeed launcher's pipes) plain step lines with loss, lr, samples/s and ETA at
least every 5% of the run, so a log file never fills with carriage-return records. `log.txt` gets the
step lines in both cases.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from violet_ds.progress import DATE_FORMAT, STEP_LINES, format_duration, stderr_is_terminal

from .distributed import World

LOGGER_NAME = "violet_ds"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

def log_format(world: World) -> logging.Formatter:
    """`2026-11-27 09:49:49 INFO message`; `[rank r]` after the time when several ranks run."""
    rank = f"[rank {world.rank}] " if world.distributed else ""
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
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        if not self.bar_active:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


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
        self.log = logging.getLogger(LOGGER_NAME)
        self.log.setLevel(LEVELS[level])
        self.log.propagate = False
        # DeepSpeed's own console chatter follows the level too (its debug output stays off)
        self._deepspeed_level = logging.getLogger("DeepSpeed").level
        logging.getLogger("DeepSpeed").setLevel(max(LEVELS[level], logging.INFO))
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
            self.log.addHandler(console)
            self._handlers.append(console)
            self._capture_python_warnings()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for handler in (logging.FileHandler(self.run_dir / "log.txt"), self.console):
            handler.setFormatter(log_format(world))
            self.log.addHandler(handler)
            self._handlers.append(handler)
        self._capture_python_warnings()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the resumed step that an interrupted run had already written
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        if config_text:
            self.text("config", config_text, step=(purge_step - 1) if purge_step else 0)

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

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

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
        ds_config) when one is enabled: they then get every loss term, not only DeepSpeed's lr."""
        if self.world.is_main and getattr(monitor, "enabled", False):
            self.monitor = monitor

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
        """Append one JSON line to metrics.jsonl."""
        if not self.world.is_main:
            return
        clean = {}
        for key, value in record.items():
            number = _as_float(value)
            clean[key] = number if number is not None and not isinstance(value, int) else value
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
            import wandb

            wandb.finish()
        self.monitor = None
        if self._captured_warnings:
            logging.captureWarnings(False)
            self._captured_warnings = False
        for handler in self._handlers:
            self.log.removeHandler(handler)
            logging.getLogger("py.warnings").removeHandler(handler)
            handler.close()
        self._handlers = []
        logging.getLogger("DeepSpeed").setLevel(self._deepspeed_level)


def progress_bar(total: int, initial: int, world: World, enabled: bool, desc: str = "train"):
    """tqdm on rank 0 when stderr is a terminal (a disabled bar elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc,
                disable=not (enabled and world.is_main and stderr_is_terminal()), dynamic_ncols=True, leave=True)


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
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
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
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
