"""Run-directory logging: TensorBoard scalars/images, `metrics.jsonl`, `log.txt`, tqdm progress.

Only rank 0 writes files; other ranks get a logger whose writers are no-ops, so callers never branch
on the rank.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .distributed import World

LOGGER_NAME = "violet_ds"


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

    def __init__(self, run_dir: Path, world: World, *, purge_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.world = world
        self.log = logging.getLogger(LOGGER_NAME)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        self._handlers: list[logging.Handler] = []
        self.writer = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for handler in (logging.FileHandler(self.run_dir / "log.txt"), logging.StreamHandler(sys.stderr)):
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
            self.log.addHandler(handler)
            self._handlers.append(handler)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the resumed step that an interrupted run had already written
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def info(self, message: str) -> None:
        if self.world.is_main:
            self.log.info(message)

    def warning(self, message: str) -> None:
        if self.world.is_main:
            self.log.warning(message)

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            number = _as_float(value)
            if number is not None and math.isfinite(number):
                self.writer.add_scalar(f"{prefix}{key}", number, step)

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
        for handler in self._handlers:
            self.log.removeHandler(handler)
            handler.close()
        self._handlers = []


def progress_bar(total: int, initial: int, world: World, enabled: bool, desc: str = "train"):
    """tqdm on rank 0 (a disabled bar elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and world.is_main),
                dynamic_ncols=True, leave=True)


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
