"""Divergence guard: a run whose loss went non-finite stops (or rolls back) instead of training on.

Cost model: per micro-batch one `isfinite` and one `logical_or` on a device scalar (no host sync);
per optimizer step the step's flag is appended to a list. The flags of the steps since the last check
are combined over ranks (one MAX all-reduce) and read by the host only at a check: at the end of each
logging window (where the trainer syncs anyway), before every checkpoint and at the end of the run.

Which checkpoint is good: the loss of step k is computed with the weights after step k-1, so a
non-finite loss first seen at step b makes the weights of steps >= b-1 suspect. A checkpoint of step
s <= b-2 is the last good one; later ones get a divergence note (`violet_ds_diverged.json`), which
keeps them out of `latest` and `--run.resume auto`. A checkpoint is never written while the current
streak of bad steps is non-zero or when any weight is non-finite (the weights are checked even with the
guard off). A save cannot know whether its finite weights give a finite loss: the next steps tell. So the
end of the run checks too: a shorter streak than `run.max_bad_steps` still running at the last step, or
non-finite weights after it, is a divergence (marks, `latest` moved back, DivergenceError), never a
finished run.

`run.on_divergence: rollback` reloads the last good checkpoint (weights, optimizer, schedule; the data
cursor is kept, so the window of samples that led to the divergence is skipped) and continues, at most
`run.max_rollbacks` times, each logged.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Protocol

import torch
import yaml

from ..config import RunConfig
from ..data.sampler import SampleCursor
from . import checkpoint as ckpt
from .distributed import World
from .logging import RunLogger


class DivergenceError(RuntimeError):
    """The loss stayed non-finite for `run.max_bad_steps` consecutive steps."""


@dataclass
class Verdict:
    """What a check found: `diverged` when the streak reached the limit (then `first_bad_step` is its start)."""

    diverged: bool = False
    bad_steps: int = 0
    """non-finite steps among those checked"""
    streak: int = 0
    """consecutive non-finite steps ending at the last checked step"""
    first_bad_step: Optional[int] = None
    """first step of the current streak (None without one)"""


class DivergenceGuard:
    def __init__(self, max_bad_steps: int, world: World):
        self.max_bad_steps = int(max_bad_steps)
        self.world = world
        self.enabled = self.max_bad_steps > 0
        self._micro_bad: Optional[torch.Tensor] = None
        self._flags: List[torch.Tensor] = []
        self._first_step = 0
        # streak carried over from earlier checks (host side)
        self.streak = 0
        self.streak_start: Optional[int] = None
        self.total_bad = 0

    def observe(self, loss: torch.Tensor) -> None:
        """After each micro-batch's forward: remember (on the device) whether its loss was finite."""
        if not self.enabled:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._micro_bad = bad if self._micro_bad is None else self._micro_bad | bad

    def end_step(self, step: int) -> None:
        """After the optimizer step `step` (1-based): close its flag."""
        if not self.enabled:
            return
        if not self._flags:
            self._first_step = step
        flag = self._micro_bad if self._micro_bad is not None else torch.zeros((), dtype=torch.bool)
        self._flags.append(flag)
        self._micro_bad = None

    def check(self) -> Verdict:
        """Combine the pending step flags over ranks (one collective, one host sync) and update the streak."""
        if not self.enabled or not self._flags:
            return Verdict(streak=self.streak, first_bad_step=self.streak_start)
        flags = torch.stack([f.to(self.world.device) for f in self._flags]).to(torch.float32)
        if self.world.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        values = flags.cpu().tolist()
        first = self._first_step
        self._flags = []
        bad_here = 0
        diverged_at: Optional[int] = None
        for offset, value in enumerate(values):
            if value > 0:
                bad_here += 1
                if self.streak == 0:
                    self.streak_start = first + offset
                self.streak += 1
                if diverged_at is None and self.streak >= self.max_bad_steps:
                    diverged_at = self.streak_start
            else:
                self.streak, self.streak_start = 0, None
        self.total_bad += bad_here
        if diverged_at is not None:
            return Verdict(diverged=True, bad_steps=bad_here, streak=self.streak, first_bad_step=diverged_at)
        return Verdict(bad_steps=bad_here, streak=self.streak, first_bad_step=self.streak_start)

    def reset(self) -> None:
        """After a rollback: the pending flags and the streak belong to the abandoned weights."""
        self._flags, self._micro_bad = [], None
        self.streak, self.streak_start = 0, None


def weights_finite(module: torch.nn.Module, world: World) -> bool:
    """Every parameter of `module` finite on every rank (one reduction per parameter, one host sync)."""
    checks = [torch.isfinite(p.detach()).all() for p in module.parameters() if p.numel()]
    ok = torch.stack(checks).all().to(torch.float32).reshape(1) if checks else torch.ones(1)
    if world.distributed:
        ok = ok.to(world.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() > 0)


def _configured_lr(resolved_config: str) -> Optional[float]:
    """optim.lr of the run's resolved config (None when it cannot be read)."""
    try:
        config = yaml.safe_load(resolved_config or "") or {}
        return float(config["optim"]["lr"])
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def last_good_step(saved_steps: List[int], first_bad_step: int) -> Optional[int]:
    """The newest saved step whose weights produced a finite loss (see the module docstring)."""
    good = [s for s in saved_steps if s <= first_bad_step - 2]
    return max(good) if good else None


class Position(Protocol):
    """Where the guarded loop stands (the trainer's `TrainState`), read by the guard, never written."""

    step: int
    cursor: SampleCursor


@dataclass
class GuardedRun:
    """What `DivergenceWatch` is given by the loop it guards (the trainer)."""

    run: RunConfig
    """run.max_bad_steps, run.on_divergence, run.max_rollbacks, run.resume"""
    world: World
    logger: RunLogger
    position: Position
    module: torch.nn.Module
    """the trained module: its weights are checked before every save and at the end"""
    checkpoint_dir: Path
    restore: Callable[[str], int]
    """reload a checkpoint tag (weights, optimizer, schedule position) and put the loop at its step, which it
    returns; the data cursor stays where it is"""
    run_dir: Path
    command: str = "pretrain"
    """the violet-ds command of the run, named in the advice"""
    resolved_config: str = ""
    """the run's resolved config (YAML): its optim.lr is halved in the advice"""


# A test hook, None in every real run: `loss_fault(step, rank, loss) -> loss` replaces the loss the guard sees (never
# the one trained on), so tests and drills can make chosen optimizer steps non-finite (tests/nonfinite_cli.py).
LossFault = Callable[[int, int, torch.Tensor], torch.Tensor]
loss_fault: Optional[LossFault] = None


class DivergenceWatch:
    """The trainer's side of the guard: observe, check at the logging window, gate saves, stop or roll back.

    The trainer calls `observe(loss)` per micro-batch, `end_step(step)` per optimizer step,
    `check_window()` where it logs (True: a rollback happened, skip the rest of this step), and asks
    `allow_save()` before every checkpoint.
    """

    def __init__(self, guarded: GuardedRun):
        self.guarded = guarded
        self.logger = guarded.logger
        self.guard = DivergenceGuard(guarded.run.max_bad_steps, guarded.world)
        self.mode = guarded.run.on_divergence
        self.max_rollbacks = guarded.run.max_rollbacks
        self.rollbacks: List[dict] = []

    # ---- per step (no host sync)
    def observe(self, loss: torch.Tensor) -> None:
        if loss_fault is not None:
            loss = loss_fault(self.guarded.position.step + 1, self.guarded.world.rank, loss)
        self.guard.observe(loss)

    def end_step(self, step: int) -> None:
        self.guard.end_step(step)

    # ---- at the logging window / before a save
    def check_window(self) -> bool:
        verdict = self.guard.check()
        if verdict.bad_steps:
            self.logger.warning(f"step {self.guarded.position.step}: {verdict.bad_steps} step(s) with a "
                                        f"non-finite loss since the last check ({verdict.streak} in a row now, "
                                        f"run.max_bad_steps={self.guard.max_bad_steps})")
        if not verdict.diverged:
            return False
        return self._diverged(verdict.first_bad_step or self.guarded.position.step)

    def allow_save(self) -> bool:
        """False (with a warning) while the loss is non-finite or any weight is; may stop or roll back. The weights
        are checked with the guard off (run.max_bad_steps 0) too."""
        step = self.guarded.position.step
        if self.guard.enabled:
            if self.check_window():
                return False
            if self.guard.streak > 0:
                self.logger.warning(f"not saving step {step}: the last {self.guard.streak} step(s) had a "
                                            "non-finite loss")
                return False
        if not weights_finite(self.guarded.module, self.guarded.world):
            self.logger.warning(f"not saving step {step}: some weights are not finite")
            return False
        return True

    def check_end(self) -> bool:
        """At the end of the run: a run never ends `finished` on a non-finite loss or with non-finite weights.

        The loss of step k is computed with the weights of step k-1, so a save can only see that its (finite)
        weights give a non-finite loss at the next steps: a streak shorter than run.max_bad_steps at the end, or
        weights that are not finite after the last step, count as a divergence (later checkpoints are marked,
        `latest` goes back to the last good one, DivergenceError). True: rolled back (run.on_divergence
        rollback), train on."""
        if self.guard.enabled:
            if self.check_window():
                return True
            if self.guard.streak > 0:
                first = self.guard.streak_start or self.guarded.position.step
                return self._diverged(first, cause=(
                    f"the loss was non-finite on the last {self.guard.streak} step(s) of the run, from step {first} "
                    f"(fewer than run.max_bad_steps={self.guard.max_bad_steps}, but the run ended on them)"))
        if not weights_finite(self.guarded.module, self.guarded.world):
            step = self.guarded.position.step
            return self._diverged(step + 1, cause=f"the weights are not finite after the last step ({step})")
        return False

    def report(self) -> dict:
        return {"bad_steps": self.guard.total_bad, "rollbacks": self.rollbacks,
                "max_bad_steps": self.guard.max_bad_steps, "on_divergence": self.mode}

    # ---- divergence
    def _saved_steps(self) -> dict:
        checkpoint_dir = self.guarded.checkpoint_dir
        steps = {}
        for tag in ckpt.complete_tags(checkpoint_dir):
            try:
                marker = ckpt.read_marker(checkpoint_dir / tag)
            except ckpt.CheckpointError:
                continue
            steps[int(marker.get("step") or 0)] = tag
        return steps

    def _diverged(self, first_bad: int, cause: Optional[str] = None) -> bool:
        guarded = self.guarded
        checkpoint_dir = guarded.checkpoint_dir
        saved = self._saved_steps()
        good_step = last_good_step(sorted(saved), first_bad)
        good_tag = saved.get(good_step) if good_step is not None else None
        suspect = [tag for step, tag in sorted(saved.items()) if step >= first_bad - 1]
        if guarded.world.is_main:
            ckpt.mark_diverged(checkpoint_dir, suspect, first_bad)
            if good_tag is not None:
                ckpt.write_latest(checkpoint_dir, good_tag)
            else:
                (checkpoint_dir / ckpt.LATEST_FILE).unlink(missing_ok=True)
        ckpt.barrier(guarded.world)
        where = (f"Last good checkpoint: {checkpoint_dir / good_tag} (now `latest`)" if good_tag
                 else "No good checkpoint was saved before it")
        marked = f"; marked diverged (never resumed by `auto`): {', '.join(suspect)}" if suspect else ""
        if self.mode == "rollback" and good_tag is not None and len(self.rollbacks) < self.max_rollbacks:
            self._rollback(good_tag, first_bad, marked)
            return True
        limit = (f"; {len(self.rollbacks)} rollback(s) (run.max_rollbacks={self.max_rollbacks}) did not help"
                 if self.mode == "rollback" else "")
        cause = cause or (f"the loss was non-finite on {self.guard.max_bad_steps} consecutive steps from step "
                          f"{first_bad} (run.max_bad_steps={self.guard.max_bad_steps})")
        message = (f"the run diverged: {cause}{limit}. {where}{marked}. "
                   f"{self.advice(good_tag)}")
        self.logger.record({"step": guarded.position.step, "event": "diverged", "first_bad_step": first_bad,
                               "last_good_checkpoint": good_tag})
        self.logger.flush()
        raise DivergenceError(message)

    def advice(self, good_tag: Optional[str]) -> str:
        """What to run next: resume `good_tag` with half the learning rate (a resume takes the LR schedule from the
        current config), or, without a good checkpoint, start the run over with it."""
        guarded = self.guarded
        lr = _configured_lr(guarded.resolved_config)
        lower = f"--optim.lr {lr / 2:g}" if lr else "--optim.lr <lower>"
        base = f"violet-ds {guarded.command} --config {shlex.quote(str(guarded.run_dir))}"
        rollback = ", or set run.on_divergence rollback" if self.mode != "rollback" else ""
        if good_tag is not None:
            return (f"Continue from it with half the learning rate (the resumed run follows the LR schedule of its "
                    f"own config from that step): {base} --run.resume {good_tag} {lower} (or more warm-up, "
                    f"--optim.warmup_steps N){rollback}")
        fresh = " --run.resume null" if guarded.run.resume else ""
        return (f"Start it over with half the learning rate (this deletes its checkpoints): {base} --run.overwrite "
                f"true{fresh} {lower} (or more warm-up, --optim.warmup_steps N)")

    def _rollback(self, good_tag: str, first_bad: int, marked: str) -> None:
        position = self.guarded.position
        from_step = position.step
        # weights, optimizer and the schedule's step go back (the schedule itself stays this run's config); the
        # data cursor does not: the samples between the checkpoint and now (which led to the divergence) are skipped
        to_step = self.guarded.restore(good_tag)
        self.guard.reset()
        cursor = position.cursor
        event = {"from_step": from_step, "to_step": to_step, "tag": good_tag, "first_bad_step": first_bad,
                 "epoch": cursor.epoch, "micro_in_epoch": cursor.micro_in_epoch}
        self.rollbacks.append(event)
        self.logger.warning(f"rollback {len(self.rollbacks)}/{self.max_rollbacks}: non-finite loss from step "
                            f"{first_bad}; reloaded {good_tag} (step {to_step}) and skip the data seen since (cursor "
                            f"stays at epoch {cursor.epoch}, micro-batch {cursor.micro_in_epoch}){marked}")
        self.logger.record({"step": to_step, "event": "rollback", **event})
