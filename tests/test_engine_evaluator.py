"""engine/evaluator.py: the evaluation loop over a task's hooks, output merging and de-duplication by index."""

from __future__ import annotations

import torch
from torch import nn

from violet_ds.engine.distributed import World
from violet_ds.engine.evaluator import evaluate, gather_outputs, merge_outputs, to_device
from violet_ds.tasks.base import Task


class _Counter(Task):
    """Evaluates step by step: the mean of every `x` it saw, and how many batches each call handled."""

    def build(self):
        self.calls = 0

    def evaluate_step(self, batch):
        self.calls += 1
        return {"x": batch["x"], "index": batch["index"]}

    def evaluate_end(self, outputs, world):
        merged = gather_outputs(outputs, world)
        return {"mean": float(merged["x"].float().mean()), "count": float(merged["x"].numel())}


class _Whole(_Counter):
    def evaluate_full(self, loaders, world, max_batches=None):
        return {"whole": 1}


def _loader(values: list[int], batch: int = 2) -> list[dict]:
    return [{"x": torch.tensor(values[i:i + batch]), "index": torch.arange(i, min(i + batch, len(values)))}
            for i in range(0, len(values), batch)]


def test_evaluate_runs_the_step_hooks_per_loader_and_restores_training():
    task = _Counter(nn.Identity(), None)
    task.train()
    metrics = evaluate(task, {"val": _loader([1, 2, 3, 4]), "other": _loader([10, 20])}, World())
    assert metrics == {"mean": 2.5, "count": 4.0, "other/mean": 15.0, "other/count": 2.0}
    assert task.training
    capped = evaluate(task, {"val": _loader([1, 2, 3, 4])}, World(), max_batches=1)
    assert capped == {"mean": 1.5, "count": 2.0}


def test_a_task_that_evaluates_itself_is_not_stepped():
    task = _Whole(nn.Identity(), None)
    assert evaluate(task, {"val": _loader([1, 2])}, World()) == {"whole": 1.0}
    assert task.calls == 0


def test_gather_drops_samples_padded_in_twice_and_merges_lists():
    outputs = [{"x": torch.tensor([5, 6]), "index": torch.tensor([1, 0]), "name": ["b", "a"]},
               {"x": torch.tensor([6]), "index": torch.tensor([0]), "name": ["a"]}]
    merged = gather_outputs(outputs, World())
    assert merged["index"].tolist() == [0, 1] and merged["x"].tolist() == [6, 5] and merged["name"] == ["a", "b"]
    assert merge_outputs([{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)}])["loss"].tolist() == [1.0, 2.0]
    moved = to_device({"x": torch.zeros(1), "names": ["a"]}, torch.device("cpu"))
    assert moved["names"] == ["a"] and moved["x"].device.type == "cpu"
