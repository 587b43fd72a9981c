"""The stall detector: a collapsed scorer (loss at ln K, gradient gone) is named once; a learning run is not."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from violet_ds.config import RunConfig
from violet_ds.engine.distributed import World
from violet_ds.engine.logging import RunLogger
from violet_ds.engine.stall import StallDetector, chance_of
from violet_ds.engine.trainer import Trainer
from violet_ds.tasks.base import Task
from violet_ds.tasks.common import chance_loss

K = 5


class OptionScorer(Task):
    """K-way multiple choice over per-option features through a 2-layer head (like `heads.score`).

    `collapsed`: the features the head sees do not depend on the option (as when the pooled output has
    learned to ignore the option text), so every option scores the same whatever the weights.
    """

    def __init__(self, collapsed: bool, dim: int = 16):
        super().__init__(nn.Identity(), SimpleNamespace(collapsed=collapsed, dim=dim))

    def build(self):
        self.collapsed = self.cfg.collapsed
        self.head = nn.Sequential(nn.Linear(self.cfg.dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def chance_losses(self):
        return {"loss": chance_loss(K)}

    def forward(self, batch):
        features = batch["features"]  # (B, K, dim)
        if self.collapsed:
            features = features.mean(dim=1, keepdim=True).expand_as(features)
        scores = self.head(features).squeeze(-1)
        return {"loss": F.cross_entropy(scores, batch["answer"])}


class PlainEngine:
    """The slice of a DeepSpeed engine the trainer uses: forward, backward, step, grad norm, save."""

    def __init__(self, module: nn.Module, lr: float):
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
        self.skipped_steps = 0
        self.nonfinite_skip = None
        self.norm = None

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.optimizer.step()

    def get_global_grad_norm(self):
        return self.norm

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)


def option_batches(count: int, seed: int):
    """Option features whose first coordinate marks the right answer (plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        features = torch.randn(8, K, 16, generator=generator)
        answer = torch.randint(0, K, (8,), generator=generator)
        features[torch.arange(8), answer, 0] += 2.0
        batches.append({"features": features, "answer": answer})
    return batches


def run_trainer(tmp_path: Path, collapsed: bool, steps: int = 120) -> tuple[list[str], Trainer]:
    torch.manual_seed(0)
    task = OptionScorer(collapsed)
    if collapsed:
        nn.init.zeros_(task.head[2].weight)
        nn.init.zeros_(task.head[2].bias)
    engine = PlainEngine(task, lr=3e-3)
    batches = option_batches(steps, seed=1)
    run = RunConfig(name="stall", output_dir=str(tmp_path), max_steps=steps, log_every=5, save_every=0,
                    image_every=0, progress=False, keep_last=1)
    logger = RunLogger(tmp_path / "stall", World())
    warnings: list[str] = []
    trainer = Trainer(engine=engine, scheduler=None, make_loader=lambda cursor: batches[cursor.micro_in_epoch:],
                      micro_per_epoch=steps, world=World(), run=run, run_dir=tmp_path / "stall", logger=logger,
                      batch_size=8, grad_accum=1, total_steps=steps)
    assert trainer.stall.chance == {"loss": pytest.approx(math.log(K))}
    trainer.stall = StallDetector.for_task(task, warnings.append, window=40)
    summary = trainer.fit()
    logger.close()
    return warnings, summary


def test_collapsed_head_is_named_once(tmp_path):
    warnings, summary = run_trainer(tmp_path, collapsed=True)
    assert summary.last_loss == pytest.approx(math.log(K), abs=1e-4)
    assert len(warnings) == 1
    assert "training stalled" in warnings[0] and "ln 5" in warnings[0] and "collapsed" in warnings[0]


def test_learning_run_is_not_flagged(tmp_path):
    warnings, summary = run_trainer(tmp_path, collapsed=False)
    assert summary.last_loss < 0.8 * math.log(K)
    assert warnings == []


def test_plateau_with_live_gradient_is_not_a_stall():
    """A loss still at chance while the gradient stays large (an early plateau) is not flagged."""
    seen: list[str] = []
    detector = StallDetector({"loss": math.log(K)}, seen.append, window=50)
    for step in range(10, 400, 10):
        detector.update(step, {"loss": math.log(K) + 0.002}, grad_norm=0.5)
    assert seen == []
    # the same plateau once the gradient has decayed to a hundredth of its peak
    for step in range(400, 500, 10):
        detector.update(step, {"loss": math.log(K) - 0.001}, grad_norm=0.004)
    assert len(seen) == 1 and "since step 10" in seen[0]
    detector.update(510, {"loss": math.log(K)}, grad_norm=0.0)
    assert len(seen) == 1  # once per run
    assert detector.report() == {"term": "loss", "since": 10, "warned_at": 400, "left_at": None}


def test_a_plateau_that_ends_is_reported_once_as_info():
    """Held-out motion runs sat at ln 5 for 500-700 steps and then learned: the log says so after the warning."""
    warned: list[str] = []
    infos: list[str] = []
    detector = StallDetector({"loss": math.log(K)}, warned.append, window=50, info=infos.append)
    for step in range(10, 200, 10):
        detector.update(step, {"loss": math.log(K)}, grad_norm=0.001)
    assert len(warned) == 1 and infos == []
    # wobbling inside the plateau's noise is not leaving it
    detector.update(200, {"loss": math.log(K) - 0.03}, grad_norm=0.5)
    assert infos == []
    detector.update(210, {"loss": 1.40}, grad_norm=5.0)
    detector.update(220, {"loss": 1.20}, grad_norm=5.0)
    assert len(infos) == 1 and "at step 210" in infos[0] and "training data" in infos[0]
    assert detector.report() == {"term": "loss", "since": 10, "warned_at": 60, "left_at": 210}
    assert len(warned) == 1


def test_chance_values_of_the_tasks():
    assert chance_loss(5) == pytest.approx(math.log(5))
    # LAVENDER true/false: the best constant answer is p(true) = 1/K
    assert chance_loss(5, true_false=True) == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)))
    assert chance_of(Task(nn.Identity(), None)) == {}
    assert chance_of(OptionScorer(True)) == {"loss": pytest.approx(math.log(5))}


def test_a_component_term_is_named_without_the_gradient_test():
    """Pretraining's `loss_vtm` is one objective of several: the gradient norm stays up (MLM and MVM learn), so a
    matching term that stays within 5% of chance for `component_window` steps is named on its own."""
    chance = chance_loss(4, true_false=True)
    warned: list[str] = []
    infos: list[str] = []
    detector = StallDetector({"loss_vtm": chance}, warned.append, window=50, info=infos.append)
    assert detector.component_window == 200
    detector.update(10, {"loss_vtm": 5.9, "loss": 12.0}, grad_norm=3.0)  # the first steps: far above chance
    for step in range(20, 220, 10):
        detector.update(step, {"loss_vtm": chance + 0.017, "loss": 2.0}, grad_norm=2.0)
    assert warned == []  # 190 steps on the plateau: not yet
    detector.update(220, {"loss_vtm": chance + 0.017, "loss": 2.0}, grad_norm=2.0)
    assert len(warned) == 1 and "`loss_vtm`" in warned[0] and "other objectives" in warned[0]
    assert "task.vtm_listwise" in warned[0]
    detector.update(230, {"loss_vtm": 0.9 * chance}, grad_norm=2.0)
    assert len(infos) == 1 and detector.report() == {"term": "loss_vtm", "since": 20, "warned_at": 220, "left_at": 230}


def test_a_component_that_learns_is_not_named():
    detector = StallDetector({"loss_vtm": math.log(8)}, pytest.fail, window=50)
    value = math.log(8)
    for step in range(10, 400, 10):
        value *= 0.97  # leaves the +-5% band after two logged windows
        detector.update(step, {"loss_vtm": value}, grad_norm=2.0)
    assert detector.report() is None
