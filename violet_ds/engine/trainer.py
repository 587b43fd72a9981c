"""The one training loop: every task, every launcher, CPU or GPU.

DeepSpeed does the accumulation: `engine.backward` + `engine.step` on every micro-batch, the optimizer
actually steps on accumulation boundaries. The loop owns what DeepSpeed does not: the data cursor,
RNG states, logging, validation, checkpoint cadence and preemption. `Trainer.fit` reads as the list
of what happens per micro-batch and per optimizer step; each step it names does one thing.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch

from ..config import RunConfig
from ..data.sampler import SampleCursor
from . import checkpoint as ckpt
from . import deepspeed_engine as dse
from .divergence import DivergenceWatch, GuardedRun
from .distributed import World
from .evaluator import evaluate, to_device
from .logging import RunLogger, TrainProgress, memory_mb
from .optim import apply_settings, optimizer_settings
from .stall import StallDetector


def steps_per_epoch(micro_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of `micro_per_epoch` micro-batches per rank (whole accumulation windows)."""
    steps = micro_per_epoch // grad_accum
    if steps == 0:
        raise ValueError(f"an epoch has {micro_per_epoch} micro-batches per rank, fewer than engine.grad_accum="
                         f"{grad_accum}: less than one optimizer step; use more data, a smaller data.batch_size "
                         "or fewer ranks")
    return steps


@dataclass
class TrainState:
    """Where training stands; the part of a checkpoint's client state that the loop owns."""

    step: int = 0
    """optimizer steps done (skipped ones included)"""
    cursor: SampleCursor = field(default_factory=SampleCursor)
    """where the run is in its data"""


@dataclass
class TrainSummary:
    steps: int = 0
    epochs_done: int = 0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    losses: List[float] = field(default_factory=list)
    skipped_steps: int = 0
    preempted: bool = False
    stop_signal: Optional[str] = None
    """the signal that stopped the run (with `preempted`)"""
    start_step: int = 0
    """the step the run started from (a resumed run: its checkpoint's)"""
    last_checkpoint: Optional[str] = None
    val_metrics: Dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class _LogWindow:
    """What the loop gathers between two logged steps: a window costs one host sync and one collective."""

    started: float = field(default_factory=time.time)
    steps: int = 0
    micro_batches: int = 0
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    """per scalar output of the task, its sum over the window's micro-batches (on the device)"""
    indices: List[int] = field(default_factory=list)
    """sample indices of the window (with run.log_sample_indices)"""

    def add(self, outputs: Mapping[str, Any]) -> None:
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.detach().float().reshape(())
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.micro_batches += 1


class _StopSignal:
    """Record SIGTERM/SIGUSR1 (with `enabled`: run.save_on_sigterm) and a first SIGINT instead of dying mid-step;
    the loop saves and exits at the next boundary. A second SIGINT raises KeyboardInterrupt at once (no save)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    INTERRUPT_NOTE = (b"SIGINT: finishing the current step, then saving a checkpoint and stopping "
                      b"(Ctrl-C again stops at once, without saving)\n")

    def __init__(self, enabled: bool, announce: bool = True):
        self.received: Optional[str] = None
        self.interrupts = 0
        self.saved = False  # the stop's checkpoint is written: a late Ctrl-C has nothing left to cut short
        self._announce = announce
        self._previous: Dict[int, Any] = {}
        for name in (self.SIGNALS if enabled else ()) + ("SIGINT",):
            number = getattr(signal, name, None)
            if number is None:
                continue
            try:
                self._previous[number] = signal.signal(number, self._interrupt if name == "SIGINT" else self._handle)
            except ValueError:
                # not the main thread (e.g. called from a worker thread): keep default behaviour
                pass

    def _handle(self, number, frame) -> None:
        self.received = signal.Signals(number).name

    def _interrupt(self, number, frame) -> None:
        self.interrupts += 1
        if self.saved:
            return
        if self.interrupts > 1:
            raise KeyboardInterrupt("second Ctrl-C: stopped at once, without saving")
        self.received = self.received or "SIGINT"
        if self._announce:
            # a signal handler may run inside a logging call: write the note straight to stderr
            os.write(2, self.INTERRUPT_NOTE)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class Trainer:
    """Runs `engine` (a DeepSpeed engine wrapping a task) over a resumable loader.

    `make_loader(cursor)` must return an iterable over this rank's micro-batches of `cursor.epoch`
    starting after the samples the `SampleCursor` says were consumed (the resumable sampler's `seek`),
    with the same order a fresh epoch would have had.
    """

    def __init__(self, *, engine, scheduler, make_loader: Callable[[SampleCursor], Any], micro_per_epoch: int,
                 world: World, run: RunConfig, run_dir: Path, logger: RunLogger, batch_size: int,
                 grad_accum: int, total_steps: int, resolved_config: str = "", command: str = "pretrain",
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
        self.steps_per_epoch = steps_per_epoch(micro_per_epoch, grad_accum)
        # whole accumulation windows only, so that every optimizer step sees grad_accum micro-batches
        self.micro_per_epoch = self.steps_per_epoch * grad_accum
        self.total_steps = total_steps
        self.resolved_config = resolved_config
        self.command = command
        # the LR schedule and AdamW settings of this run's config, taken before any checkpoint is loaded: a
        # loaded checkpoint's schedule is replaced by them (`load_checkpoint`)
        self._configured = optimizer_settings(scheduler) if scheduler is not None else None
        self.val_loaders = val_loaders
        self.log_every = max(1, run.log_every)
        self.state = TrainState()
        # wandb / csv through the ds_config's monitor blocks get the same scalars as TensorBoard
        logger.attach_monitor(getattr(engine, "monitor", None))
        self.divergence = DivergenceWatch(GuardedRun(
            run=run, world=world, logger=logger, position=self.state, module=self.task,
            checkpoint_dir=self.checkpoint_dir, restore=self.restore, run_dir=self.run_dir, command=command,
            resolved_config=resolved_config))
        # warns once when a loss sits at its chance value (ln #candidates) with a vanishing gradient
        self.stall = StallDetector.for_task(self.task, self.logger.warning, info=self.logger.info)
        # what one `fit` carries from step to step
        self._bar: Optional[TrainProgress] = None
        self._window = _LogWindow()
        self._step_lr = 0.0
        self._pending_rng: Optional[dict] = None
        self._last_saved_step = -1
        # every rank's stop flag, combined where the loop closes a logging window (None: no window this step)
        self._window_stop: Optional[bool] = None
        self._skipped_seen = 0
        self.summary = TrainSummary()

    # ------------------------------------------------------------------ checkpoints
    def client_state(self) -> dict:
        return ckpt.client_state(self.state.step, self.state.cursor, self.world.world_size, self.resolved_config,
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
        client, changes = self.load_checkpoint(tag)
        step, cursor = ckpt.train_position(client, tag)
        # in place: the divergence guard reads the same state object
        self.state.step, self.state.cursor = step, cursor
        marker = ckpt.read_marker(self.checkpoint_dir / tag)
        universal = (f" (a universal checkpoint, converted from {marker.get('source_tag')} of "
                     f"{marker.get('source_world_size')} rank(s))" if marker.get("universal") else "")
        self.logger.info(f"resumed from {self.checkpoint_dir / tag}: step {step}, epoch {cursor.epoch}, "
                         f"{cursor.micro_in_epoch} micro-batches into the epoch{universal}")
        rng = ("RNG streams" if client.get("rng") is not None else
               "no RNG streams (masking and dropout draws restart from engine.seed: not an exact continuation)")
        settings = "; ".join(changes) if changes else "as in the checkpoint"
        self.logger.info(f"resume: from the checkpoint: weights, optimizer moments, step {step}, data position, {rng}; "
                         f"from this run's config: the LR schedule and AdamW settings ({settings}) and everything "
                         "else (run length, logging, evaluation, checkpoint cadence)")
        return client.get("rng")

    def load_checkpoint(self, tag: str) -> tuple[dict, list[str]]:
        """Load `tag` (weights, optimizer, schedule position, this rank's RNG file) and put this run's LR schedule
        and AdamW settings in place of the checkpoint's: (client state, "what: old -> new" per changed setting)."""
        client = ckpt.load_checkpoint(self.engine, self.checkpoint_dir, tag, self.world)
        changes = apply_settings(self.scheduler, self._configured) if self._configured is not None else []
        return client, changes

    def restore(self, tag: str) -> int:
        """Roll back to `tag`: its weights, optimizer and schedule position, and its step (returned); the data cursor
        stays where it is, so the samples seen since the checkpoint are skipped."""
        client, _ = self.load_checkpoint(tag)
        self.state.step = int(client["step"])
        return self.state.step

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: Optional[str] = None) -> TrainSummary:
        started = time.time()
        # kept on the trainer: what the run did so far is still there when `fit` raises
        summary = self.summary = TrainSummary()
        self._pending_rng = self.resume(resume) if resume else None
        self._last_saved_step = self.state.step if self.state.step > 0 else -1
        summary.start_step = self.state.step
        self.logger.truncate_metrics(self.state.step)
        stop = _StopSignal(self.run.save_on_sigterm, announce=self.world.is_main)
        # a tqdm bar on terminals only; step lines (>= one per 5% of the run) everywhere else
        self._bar = TrainProgress(self.total_steps, self.state.step, self.world, self.logger,
                                  enabled=self.run.progress, log_every=self.log_every)
        self._window = _LogWindow()
        self._step_lr = self._current_lr()
        try:
            while True:
                while self._more_to_train():
                    if self._train_epoch(stop, summary):
                        return summary
                self._save_if_unsaved(summary)
                # never `finished` on a non-finite loss or weights: DivergenceError, or rolled back and train on
                if not self.divergence.check_end():
                    return summary
                self._last_saved_step = self.state.step  # the checkpoint rolled back to
        finally:
            stop.restore()
            self._finish(summary, started)

    def _more_to_train(self) -> bool:
        # with max_steps the step count alone ends the run: after a resume on another world size the
        # steps per epoch differ, and an epoch bound computed from them would stop the run early
        epochs = math.ceil(self.total_steps / self.steps_per_epoch) if self.run.max_steps is None else math.inf
        return self.state.step < self.total_steps and self.state.cursor.epoch < epochs

    def _train_epoch(self, stop: _StopSignal, summary: TrainSummary) -> bool:
        """The rest of the current epoch; True when a stop signal ended the run (after saving)."""
        for batch in self._next_batches():
            if not self._train_micro_batch(batch):
                continue  # inside an accumulation window
            if self._log_step(summary, stop):
                continue  # rolled back to the last good checkpoint; the data cursor moves on
            self._maybe_log_images(batch)
            end_of_epoch = self.state.cursor.micro_in_epoch >= self.micro_per_epoch
            self._maybe_evaluate(summary)
            stopping = self._stop_agreed(stop, end_of_epoch)
            if end_of_epoch:
                self._end_epoch(summary)
            self._maybe_save(summary, end_of_epoch, stopping)
            if stopping:
                self._report_stop(stop, summary)
                return True
            if end_of_epoch:
                return False
        # a loader that ran dry before a full epoch still ends the epoch
        if self.state.cursor.micro_in_epoch != 0:
            self.state.cursor.next_epoch()
        return False

    # ------------------------------------------------------------------ the named steps
    def _next_batches(self) -> Iterator[Any]:
        """This rank's next micro-batches of the epoch, on the device, until the epoch or the run is done."""
        loader = self.make_loader(self.state.cursor)
        if self._pending_rng is not None:
            # after building the loader: nothing between here and the next step may draw randomness
            ckpt.set_rng_state(self._pending_rng)
            self._pending_rng = None
        for batch in loader:
            if self.state.cursor.micro_in_epoch >= self.micro_per_epoch or self.state.step >= self.total_steps:
                return
            yield to_device(batch, self.world.device)

    def _train_micro_batch(self, batch: Any) -> bool:
        """Forward, backward and DeepSpeed step of one micro-batch; True when it completed an optimizer step."""
        if self.run.log_sample_indices and isinstance(batch, Mapping) and "index" in batch:
            self._window.indices.extend(int(i) for i in batch["index"].tolist())
        self.task.set_step(self.state.step)
        outputs = self.engine(batch)
        loss = outputs["loss"]
        self.divergence.observe(loss)
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            # the LR this optimizer step uses: engine.step advances the schedule
            self._step_lr = self._current_lr()
        self.engine.step()
        self._window.add(outputs)
        self.state.cursor.advance(self.batch_size, self.world.world_size)
        if not boundary:
            return False
        self.state.step += 1
        self.divergence.end_step(self.state.step)
        self._window.steps += 1
        self._bar.update()
        return True

    def _log_step(self, summary: TrainSummary, stop: _StopSignal) -> bool:
        """Close the log window when it is due; True when the divergence guard rolled the run back."""
        step = self.state.step
        self._window_stop = None
        if not (step % self.log_every == 0 or self._bar.line_due(step) or step == self.total_steps):
            return False
        window, self._window = self._window, _LogWindow()
        terms, self._window_stop = self._window_means(window, stop.received is not None)
        summary.losses.append(terms.get("loss", float("nan")))
        if not math.isfinite(terms.get("loss", 0.0)):
            self.logger.warning(f"step {step}: non-finite loss {terms.get('loss')}")
        step_time = (self._window.started - window.started) / window.steps
        record = {
            "step": step, "epoch": self.state.cursor.epoch, **terms, "lr": self._step_lr,
            "grad_norm": dse.grad_norm(self.engine), "loss_scale": dse.loss_scale(self.engine),
            "skipped_steps": dse.skipped_steps(self.engine),
            "samples_per_s": self.batch_size * self.grad_accum * self.world.world_size / max(step_time, 1e-9),
            "step_time_s": step_time, "memory_mb": memory_mb(self.world.device),
            "samples_seen": self.state.cursor.samples_seen,
        }
        self.logger.scalars(step, {k: v for k, v in record.items() if k not in ("step", "epoch")}, prefix="train/",
                            samples=self.state.cursor.samples_seen)
        if self.run.log_sample_indices:
            record["indices"] = window.indices
        self.logger.record(record)
        self._warn_nonfinite_skips(step)
        self.stall.update(step, terms, record["grad_norm"])
        self._bar.report(step, terms.get("loss", float("nan")), self._step_lr, record["samples_per_s"])
        return self.divergence.check_window()

    def _warn_nonfinite_skips(self, step: int) -> None:
        """One warning per logging window in which steps were skipped for a non-finite gradient norm (fp16 overflow
        skips of DeepSpeed's loss scaler are routine and stay in the `skipped_steps` scalar only)."""
        if self.engine.nonfinite_skip is None:
            return
        skipped = self.engine.nonfinite_skip.skipped_steps()
        if skipped > self._skipped_seen:
            self.logger.warning(f"step {step}: {skipped - self._skipped_seen} optimizer step(s) skipped since the last "
                                "log line (gradient norm inf or NaN; weights and optimizer state left as they were)")
            self._skipped_seen = skipped

    def _window_means(self, window: _LogWindow, stop_here: bool) -> tuple[Dict[str, float], bool]:
        """Each scalar output averaged over the window's micro-batches and over ranks, and whether any rank was
        asked to stop: the stop flag rides in the same all-reduce (its mean is > 0 when any rank's flag is set)."""
        keys = sorted(window.sums)
        local = torch.stack([window.sums[k] for k in keys]) / window.micro_batches
        flag = torch.ones(1, device=local.device) if stop_here else torch.zeros(1, device=local.device)
        *means, stop_any = self._reduce_mean(torch.cat([local, flag])).tolist()
        return {k: float(v) for k, v in zip(keys, means)}, stop_any > 0

    def _stop_agreed(self, stop: _StopSignal, end_of_epoch: bool) -> bool:
        """Whether every rank stops (saving) after this step. With several ranks the flags are combined only where
        the stop is acted on: in the logging window's all-reduce, or by one small all-reduce before a save that falls
        outside a window; other steps make no collective and no host sync, and a stop waits for the next of those."""
        if not self.world.distributed:
            return stop.received is not None
        if self._window_stop is not None:
            return self._window_stop
        if self._save_due(end_of_epoch):
            return self._any_rank(stop.received is not None)
        return False

    def _maybe_log_images(self, batch: Mapping[str, Any]) -> None:
        if not self.run.image_every or self.state.step % self.run.image_every or not self.world.is_main:
            return
        was_training = self.task.training
        self.task.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                images = self.task.visualize(batch)
        finally:
            self.task.train(was_training)
        self.logger.images(self.state.step, images)

    def _maybe_evaluate(self, summary: TrainSummary) -> None:
        if self.run.eval_every and self.state.step % self.run.eval_every == 0:
            summary.val_metrics = self._validate()

    def _end_epoch(self, summary: TrainSummary) -> None:
        self.state.cursor.next_epoch()
        if not self.run.eval_every:
            summary.val_metrics = self._validate()

    def _save_due(self, end_of_epoch: bool) -> bool:
        """A checkpoint is due after this step (run.save_every, the end of an epoch without it, the last step)."""
        periodic = bool(self.run.save_every) and self.state.step % self.run.save_every == 0
        epoch_save = end_of_epoch and not self.run.save_every
        return periodic or epoch_save or self.state.step >= self.total_steps

    def _maybe_save(self, summary: TrainSummary, end_of_epoch: bool, stopping: bool) -> None:
        if stopping or self._save_due(end_of_epoch):
            summary.last_checkpoint = self.save() or summary.last_checkpoint
            self._last_saved_step = self.state.step

    def _report_stop(self, stop: _StopSignal, summary: TrainSummary) -> None:
        stop.saved = True
        summary.preempted = True
        summary.stop_signal = stop.received
        self.logger.warning(f"{stop.received or 'stop signal'} received: saved step {self.state.step} and "
                            "stopping; resume with --run.resume auto")

    def _save_if_unsaved(self, summary: TrainSummary) -> None:
        if self._last_saved_step != self.state.step:
            summary.last_checkpoint = self.save() or summary.last_checkpoint

    def _finish(self, summary: TrainSummary, started: float) -> None:
        self._bar.close()
        summary.steps = self.state.step
        summary.epochs_done = self.state.cursor.epoch
        summary.skipped_steps = dse.skipped_steps(self.engine)
        summary.first_loss = summary.losses[0] if summary.losses else None
        summary.last_loss = summary.losses[-1] if summary.losses else None
        summary.wall_s = time.time() - started
        self.logger.flush()

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
        self.logger.scalars(self.state.step, metrics, prefix="val/", samples=self.state.cursor.samples_seen)
        self.logger.record({"step": self.state.step, "split": "val", **metrics})
        self.logger.info(f"step {self.state.step} validation: "
                         + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics
