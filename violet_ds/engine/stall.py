"""Warn when a matching-style loss sits at chance with a vanishing gradient: a collapsed run.

A loss that picks one of K candidates (multiple-choice options, retrieval in-batch texts, VTM
negatives, action classes) starts at ln(K) when every candidate scores the same. A healthy run leaves
that value; a collapsed one stays on it while its gradient norm decays towards zero, because the
scores have become one constant that no longer depends on the video-text pair (the loss is then flat
in every direction and the optimiser has nothing left to follow). To a user it looks like bad luck;
this module names it.

Tasks declare their chance values with an optional method `chance_losses() -> {term: value}` (the
term names of their `forward` outputs, e.g. `{"loss": ln 5}` for 5-way multiple choice); the
trainer feeds every logged window to `StallDetector.update` and the detector logs one warning per
run when, for `window` consecutive steps, every logged value of a term is within `tolerance` of its
chance value and the gradient norm has fallen below `grad_drop` of the largest one seen (or below
`grad_floor`). A plateau is not always a collapse: small tasks often sit at chance for a few hundred
steps and then learn (the held-out motion QA at lr 1e-4 did in every seed). So after warning, the
detector keeps watching the term and logs once, as info, when it has clearly left its chance value;
`report()` (written to summary.json) says when the stall began, when it was named and when it ended.
Tasks without `chance_losses` are never checked.

A term other than `loss` is one objective among several (pretraining's `loss_vtm` next to MLM and
MVM). The logged gradient norm is the whole model's, kept up by the other objectives, so it says
nothing about this term: such a component is named when it has stayed within 5% of its chance value
(not yet left, not far above) for `component_window` steps (4 x `window` by default), with advice for
matching objectives trained from scratch, whose plateau can outlast a short run.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional

ADVICE = (
    "the candidates' scores have collapsed to one constant (the pooled output no longer depends on the "
    "candidate), so the loss is flat and the gradient vanishes. A run can still leave it: on small tasks a "
    "plateau of a few hundred steps is common (a line follows if this one ends). Likely cause when it persists: "
    "what separates the candidates did not reach the pooled output early enough, e.g. motion of small "
    "objects at a coarse token grid (64 px = 2x2 tokens). Options: check that the answer is visible at "
    "this data.num_frames / data.image_size (tools/diagnose_mc.py --video_probe finetune --probe_pool "
    "mean|flat trains a video-only classifier); a larger data.image_size; a pretraining whose text names "
    "what the task asks about; for head_style mlm keep task.options.mlm_listwise; a lower peak optim.lr (the "
    "collapse sets in during the high-lr phase: violet-tiny's motion QA left chance at 1e-4 and not at 3e-4). "
    "A lower option temperature or a higher lr made it worse in the demo measurements.")

COMPONENT_ADVICE = (
    "the other objectives keep the gradient alive, so this may be a plateau rather than a collapse: matching "
    "trained from scratch scores every candidate alike until what separates them (colour, motion) reaches the "
    "pooled output or the answer [MASK], and the other objectives compete for the same weights. Options: a "
    "longer run (a line follows if the plateau ends); for head_style mlm task.vtm_listwise (a softmax over each "
    "video's candidates, as head style has); more in-batch negatives (task.vtm_negatives); MVM on "
    "(task.loss_weights.mvm: it teaches the video encoder what is in the frames); starting from pretrained "
    "weights.")


def chance_of(task) -> Dict[str, float]:
    """The task's `{term: chance loss}` (its `chance_losses()` hook; empty when it declares none)."""
    return {str(k): float(v) for k, v in task.chance_losses().items() if v and math.isfinite(float(v))}


class StallDetector:
    """Feed it `(step, {term: mean over the logged window}, grad_norm)`; it warns once when a term stalls."""

    def __init__(self, chance: Mapping[str, float], warn: Callable[[str], None], *, window: int = 200,
                 tolerance: float = 0.01, grad_drop: float = 0.1, grad_floor: float = 1e-3,
                 info: Optional[Callable[[str], None]] = None, component_window: Optional[int] = None):
        self.chance = dict(chance)
        self.warn = warn
        self.info = info or warn
        self.window = max(1, int(window))
        self.component_window = max(1, int(component_window if component_window is not None else 4 * self.window))
        # absolute nats plus a small share of the chance value (ln 1000 and ln 2 alike)
        self.tolerance = float(tolerance)
        self.grad_drop = float(grad_drop)
        self.grad_floor = float(grad_floor)
        self.since: Dict[str, Optional[int]] = {term: None for term in self.chance}
        self.peak_grad = 0.0
        self.message: Optional[str] = None
        # the stall named in this run, once the warning fires: {term, since, warned_at, left_at}
        self.stalled: Optional[dict] = None

    @classmethod
    def for_task(cls, task, warn: Callable[[str], None], **kwargs) -> "StallDetector":
        return cls(chance_of(task), warn, **kwargs)

    def _at_chance(self, value: float, chance: float) -> bool:
        return math.isfinite(value) and abs(value - chance) <= self.tolerance + 0.005 * chance

    def _has_left(self, value: float, chance: float) -> bool:
        """Clearly below chance: 5% of the chance value (ln 5: 0.08 nats), beyond the plateau's noise."""
        return math.isfinite(value) and value < chance - self._band(chance)

    def _band(self, chance: float) -> float:
        return max(self.tolerance, 0.05 * chance)

    def _near_chance(self, component: bool, value: float, chance: float) -> bool:
        """The plateau test: tight around chance for the total loss, +-5% for a component (see module doc)."""
        if not component:
            return self._at_chance(value, chance)
        return math.isfinite(value) and abs(value - chance) <= self._band(chance)

    def report(self) -> Optional[dict]:
        """`{term, since, warned_at, left_at}` of the stall named in this run (left_at None: never left)."""
        return dict(self.stalled) if self.stalled else None

    def _watch_recovery(self, step: int, terms: Mapping[str, float]) -> None:
        stall = self.stalled
        value = terms.get(stall["term"])
        chance = self.chance[stall["term"]]
        if stall["left_at"] is None and value is not None and self._has_left(float(value), chance):
            stall["left_at"] = step
            self.info(f"the stall named at step {stall['warned_at']} has ended: `{stall['term']}` left its chance "
                      f"value {chance:.4f} at step {step} ({float(value):.4f}), {step - stall['since']} steps after "
                      f"the plateau began: the run fits its training data again (validation says whether it generalises)")

    def update(self, step: int, terms: Mapping[str, float], grad_norm: Optional[float]) -> Optional[str]:
        """Returns the warning the first time a stall is seen (after logging it), else None."""
        if not self.chance:
            return None
        if self.stalled:
            self._watch_recovery(step, terms)
            return None
        grad_known = grad_norm is not None and math.isfinite(grad_norm)
        if grad_known:
            self.peak_grad = max(self.peak_grad, float(grad_norm))
        for term, chance in self.chance.items():
            value = terms.get(term)
            component = term != "loss"
            if value is None or not self._near_chance(component, float(value), chance):
                self.since[term] = None
                continue
            if self.since[term] is None:
                self.since[term] = step
            steps = step - self.since[term]
            if steps < (self.component_window if component else self.window):
                continue
            if component:
                why = f"while the other objectives train: {COMPONENT_ADVICE}"
            else:
                vanished = grad_known and (grad_norm <= self.grad_floor or grad_norm <= self.grad_drop * self.peak_grad)
                if not vanished:
                    continue
                why = f"while the gradient norm fell to {grad_norm:.2e} (peak {self.peak_grad:.2e}): {ADVICE}"
            candidates = math.exp(chance)
            as_ln = f" = ln {round(candidates)}" if abs(candidates - round(candidates)) < 1e-6 else ""
            near = "within 5% of its chance value" if component else "its chance value"
            self.message = (f"training stalled: `{term}` has stayed at {float(value):.4f}, {near} {chance:.4f}{as_ln} "
                            f"(every candidate scored alike), for {steps} steps (since step {self.since[term]}) {why}")
            self.stalled = {"term": term, "since": self.since[term], "warned_at": step, "left_at": None}
            self.warn(self.message)
            return self.message
        return None
