"""The one training loop: every task, every launcher, CPU or GPU.

DeepSpeed does the accumulation: `engine.backward` + `engine.step` on every micro-batch, the optimizer
actually steps on accumulation boundaries. The loop owns what DeepSpeed does not: the data cursor,
RNG states, logging, validation, checkpoint cadence and preemption.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from ..config import RunConfig
from . import checkpoint as ckpt
from . import deepspeed_engine as dse
from .divergence import DivergenceWatch
from .distributed import World
from .evaluator import evaluate, to_device
from .logging import RunLogger, TrainProgress, memory_mb
from .stall import StallDetector


@dataclass
class TrainState:
    """Where training stands; the part of a checkpoint's client state that the loop owns."""

    step: int = 0
    """optimizer steps done (skipped ones included)"""
    epoch: int = 0
    micro_in_epoch: int = 0
    """micro-batches of `epoch` already consumed by this rank"""
    samples_seen: int = 0
    """samples consumed by all ranks together"""

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "samples_seen": self.samples_seen}


@dataclass
class TrainSummary:
    steps: int = 0
    epochs_done: int = 0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    losses: List[float] = field(default_factory=list)
    skipped_steps: int = 0
    preempted: bool = False
    last_checkpoint: Optional[str] = None
    val_metrics: Dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


class _StopSignal:
    """Record SIGTERM/SIGUSR1 instead of dying mid-step; the loop saves and exits at the next boundary."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, enabled: bool):
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}
        if not enabled:
            return
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:
                # not the main thread (e.g. called from a worker thread): keep default behaviour
                pass

    def _handle(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class Trainer:
    """Runs `engine` (a DeepSpeed engine wrapping a task) over a resumable loader.

    `make_loader(epoch, consumed)` must return an iterable over this rank's micro-batches of `epoch`
    starting after `consumed` samples (the resumable sampler's cursor), with the same order a fresh
    epoch would have had.
    """

    def __init__(self, *, engine, scheduler, make_loader: Callable[[int, int], Any], micro_per_epoch: int,
                 world: World, run: RunConfig, run_dir: Path, logger: RunLogger, batch_size: int,
                 grad_accum: int, total_steps: int, resolved_config: str = "",
                 val_loaders: Optional[Callable[[], Mapping[str, Any]]] = None):
        self.engine = engine
        self.task = engine.module
        self.scheduler = scheduler
        self.make_loader = make_loader
        self.world = world
        self.run = run
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.logger = logger
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        # whole accumulation windows only, so that every optimizer step sees grad_accum micro-batches
        self.micro_per_epoch = (micro_per_epoch // grad_accum) * grad_accum
        if self.micro_per_epoch == 0:
            raise ValueError(f"an epoch has {micro_per_epoch} micro-batches per rank, fewer than "
                             f"engine.grad_accum={grad_accum}: use more data or a smaller batch")
        self.steps_per_epoch = self.micro_per_epoch // grad_accum
        self.total_steps = total_steps
        self.resolved_config = resolved_config
        self.val_loaders = val_loaders
        self.state = TrainState()
        # wandb / csv through the ds_config's monitor blocks get the same scalars as TensorBoard
        logger.attach_monitor(getattr(engine, "monitor", None))
        self.divergence = DivergenceWatch(self)
        # warns once when a loss sits at its chance value (ln #candidates) with a vanishing gradient
        self.stall = StallDetector.for_task(self.task, self.logger.warning)

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict:
        return ckpt.client_state(self.state.as_dict(), self.world.world_size, self.resolved_config,
                                 self.engine.skipped_steps)

    def save(self) -> Optional[str]:
        if not self.divergence.allow_save():
            # never a checkpoint of non-finite (or diverging) weights
            return None
        tag = ckpt.checkpoint_tag(self.state.step)
        ckpt.save_checkpoint(self.engine, self.checkpoint_dir, tag, self.client_state(), self.world,
                             keep_last=self.run.keep_last)
        self.logger.info(f"saved checkpoint {self.checkpoint_dir / tag}")
        return tag

    def resume(self, resume: str) -> Optional[dict]:
        """Load the checkpoint `resume` names; returns the RNG states to install (or None: fresh start)."""
        tag = ckpt.resolve_resume_tag(self.checkpoint_dir, resume)
        if tag is None:
            self.logger.info(f"--run.resume {resume}: no checkpoint in {self.checkpoint_dir}, starting fresh")
            return None
        client = ckpt.load_checkpoint(self.engine, self.checkpoint_dir, tag, self.world)
        missing = [key for key in ("step", "epoch", "micro_in_epoch") if key not in client]
        if missing:
            raise RuntimeError(f"checkpoint {tag} has no {missing} in its client state (not a violet_ds run)")
        self.state = TrainState(step=int(client["step"]), epoch=int(client["epoch"]),
                                micro_in_epoch=int(client["micro_in_epoch"]),
                                samples_seen=int(client.get("samples_seen", 0)))
        self.logger.info(f"resumed from {self.checkpoint_dir / tag}: step {self.state.step}, epoch "
                         f"{self.state.epoch}, {self.state.micro_in_epoch} micro-batches into the epoch")
        return client.get("rng")

    # ------------------------------------------------------------------ helpers
    def _reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world.distributed:
            values = values.to(self.world.device)
            torch.distributed.all_reduce(values)
            values = values / self.world.world_size
        return values.cpu()

    def _any_rank(self, flag: bool) -> bool:
        if not self.world.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.world.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _current_lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def _validate(self) -> Dict[str, float]:
        if self.val_loaders is None:
            return {}
        loaders = self.val_loaders()
        if not loaders:
            return {}
        metrics = evaluate(self.task, loaders, self.world, max_batches=self.run.val_max_batches,
                           progress=self.run.progress)
        self.logger.scalars(self.state.step, metrics, prefix="val/", samples=self.state.samples_seen)
        self.logger.record({"step": self.state.step, "split": "val", **metrics})
        self.logger.info(f"step {self.state.step} validation: "
                         + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    def _images(self, batch: Mapping[str, Any]) -> None:
        if not self.world.is_main:
            return
        was_training = self.task.training
        self.task.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                images = self.task.visualize(batch)
        finally:
            self.task.train(was_training)
        self.logger.images(self.state.step, images)

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: Optional[str] = None) -> TrainSummary:
        started = time.time()
        summary = TrainSummary()
        rng = self.resume(resume) if resume else None
        resumed = self.state.step > 0
        self.logger.truncate_metrics(self.state.step)
        stop = _StopSignal(self.run.save_on_sigterm)
        log_every = max(1, self.run.log_every)
        # a tqdm bar on terminals only; step lines (>= one per 5% of the run) everywhere else
        bar = TrainProgress(self.total_steps, self.state.step, self.world, self.logger, enabled=self.run.progress,
                            log_every=log_every)
        # with max_steps the step count alone ends the run: after a resume on another world size the
        # steps per epoch differ, and an epoch bound computed from them would stop the run early
        epochs = math.ceil(self.total_steps / self.steps_per_epoch) if self.run.max_steps is None else math.inf
        sums: Dict[str, torch.Tensor] = {}
        micro_count = 0
        window_indices: List[int] = []
        window_steps = 0
        step_started = time.time()
        last_saved_step = self.state.step if resumed else -1
        step_lr = self._current_lr()
        try:
            while self.state.step < self.total_steps and self.state.epoch < epochs:
                loader = self.make_loader(self.state.epoch, self.state.micro_in_epoch * self.batch_size)
                if rng is not None:
                    # after building the loader: nothing between here and the next step may draw randomness
                    ckpt.set_rng_state(rng)
                    rng = None
                for batch in loader:
                    if self.state.micro_in_epoch >= self.micro_per_epoch or self.state.step >= self.total_steps:
                        break
                    batch = to_device(batch, self.world.device)
                    if self.run.log_sample_indices and isinstance(batch, Mapping) and "index" in batch:
                        window_indices.extend(int(i) for i in batch["index"].tolist())
                    outputs = self.engine(batch)
                    loss = outputs["loss"]
                    self.divergence.observe(loss)
                    self.engine.backward(loss)
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    if boundary:
                        step_lr = self._current_lr()
                    self.engine.step()
                    for key, value in outputs.items():
                        if isinstance(value, torch.Tensor) and value.numel() == 1:
                            value = value.detach().float().reshape(())
                            sums[key] = sums[key] + value if key in sums else value
                    micro_count += 1
                    self.state.micro_in_epoch += 1
                    self.state.samples_seen += self.batch_size * self.world.world_size
                    if not boundary:
                        continue
                    self.state.step += 1
                    self.divergence.end_step(self.state.step)
                    window_steps += 1
                    bar.update()
                    if (self.state.step % log_every == 0 or bar.line_due(self.state.step)
                            or self.state.step == self.total_steps):
                        # one host sync and one collective per logged window, not per step
                        step_time = (time.time() - step_started) / window_steps
                        step_started, window_steps = time.time(), 0
                        keys = sorted(sums)
                        means = self._reduce_mean(torch.stack([sums[k] for k in keys]) / micro_count)
                        terms = {k: float(v) for k, v in zip(keys, means.tolist())}
                        sums, micro_count = {}, 0
                        summary.losses.append(terms.get("loss", float("nan")))
                        if not math.isfinite(terms.get("loss", 0.0)):
                            self.logger.warning(f"step {self.state.step}: non-finite loss {terms.get('loss')}")
                        record = {
                            "step": self.state.step, "epoch": self.state.epoch, **terms, "lr": step_lr,
                            "grad_norm": dse.grad_norm(self.engine), "loss_scale": dse.loss_scale(self.engine),
                            "skipped_steps": int(self.engine.skipped_steps),
                            "samples_per_s": self.batch_size * self.grad_accum * self.world.world_size / max(step_time, 1e-9),
                            "step_time_s": step_time, "memory_mb": memory_mb(self.world.device),
                            "samples_seen": self.state.samples_seen,
                        }
                        self.logger.scalars(self.state.step, {k: v for k, v in record.items()
                                                              if k not in ("step", "epoch")}, prefix="train/",
                                           samples=self.state.samples_seen)
                        if self.run.log_sample_indices:
                            record["indices"] = window_indices
                        self.logger.record(record)
                        self.stall.update(self.state.step, terms, record["grad_norm"])
                        window_indices = []
                        bar.report(self.state.step, terms.get("loss", float("nan")), step_lr, record["samples_per_s"])
                        if self.divergence.check_window():
                            continue  # rolled back to the last good checkpoint; the data cursor moves on
                    if self.run.image_every and self.state.step % self.run.image_every == 0:
                        self._images(batch)
                    end_of_epoch = self.state.micro_in_epoch >= self.micro_per_epoch
                    if self.run.eval_every and self.state.step % self.run.eval_every == 0:
                        summary.val_metrics = self._validate()
                    stopping = self._any_rank(stop.received is not None)
                    periodic = bool(self.run.save_every) and self.state.step % self.run.save_every == 0
                    if end_of_epoch:
                        self.state.epoch += 1
                        self.state.micro_in_epoch = 0
                        if not self.run.eval_every:
                            summary.val_metrics = self._validate()
                    epoch_save = end_of_epoch and not self.run.save_every
                    if periodic or epoch_save or stopping or self.state.step >= self.total_steps:
                        summary.last_checkpoint = self.save() or summary.last_checkpoint
                        last_saved_step = self.state.step
                    if stopping:
                        summary.preempted = True
                        self.logger.warning(f"{stop.received or 'stop signal'} received: saved step "
                                            f"{self.state.step} and stopping; resume with --run.resume auto")
                        return summary
                    if end_of_epoch:
                        break
                # a loader that ran dry before a full epoch still ends the epoch
                if self.state.micro_in_epoch != 0:
                    self.state.epoch += 1
                    self.state.micro_in_epoch = 0
            if last_saved_step != self.state.step:
                summary.last_checkpoint = self.save() or summary.last_checkpoint
            return summary
        finally:
            stop.restore()
            bar.close()
            summary.steps = self.state.step
            summary.epochs_done = self.state.epoch
            summary.skipped_steps = int(self.engine.skipped_steps)
            summary.first_loss = summary.losses[0] if summary.losses else None
            summary.last_loss = summary.losses[-1] if summary.losses else None
            summary.wall_s = time.time() - started
            self.logger.flush()
