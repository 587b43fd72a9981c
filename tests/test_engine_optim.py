"""engine/optim.py (parameter groups, optimizer, LR schedule) and the frozen-teacher check of engine/deepspeed_engine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from violet_ds.config import OptimConfig
from violet_ds.engine import deepspeed_engine as dse
from violet_ds.engine import optim
from violet_ds.engine.distributed import World


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.video_backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.model.text = nn.Linear(4, 4)
        self.model.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.heads = nn.ModuleDict({"score": nn.Linear(4, 1)})


def test_parameter_groups_no_decay_and_video_multiplier():
    toy = _Toy()
    groups = optim.parameter_groups(toy, OptimConfig(lr=1e-4, weight_decay=0.01, video_lr_mult=0.1))
    by_name = {g["group_name"]: g for g in groups}
    assert set(by_name) == {"video_decay", "video_no_decay", "main_decay", "main_no_decay"}
    assert by_name["video_decay"]["lr"] == pytest.approx(1e-5) and by_name["main_decay"]["lr"] == 1e-4
    assert by_name["video_no_decay"]["weight_decay"] == 0.0 and by_name["main_decay"]["weight_decay"] == 0.01
    # video: Linear weight (decay); Linear bias + LayerNorm weight/bias (no decay)
    assert by_name["video_decay"]["num_params"] == 16 and by_name["video_no_decay"]["num_params"] == 4 + 8
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(toy.model.frozen) not in grouped
    assert len(grouped) == sum(1 for p in toy.parameters() if p.requires_grad)
    # a frozen teacher module is left out even if it slipped in with requires_grad=True
    teacher = toy.heads["score"]
    groups = optim.parameter_groups(toy, OptimConfig(), frozen=[teacher])
    assert id(teacher.weight) not in {id(p) for g in groups for p in g["params"]}


def test_teacher_registered_in_task_is_refused():
    toy = _Toy()
    with pytest.raises(ValueError, match="frozen teacher modules"):
        dse.initialize(toy, {}, OptimConfig(), 10, World(), frozen=[toy.model.text])


def test_cpu_optimizer_is_fused_adamw_and_schedule_shape():
    toy = _Toy()
    optimizer = optim.build_optimizer(optim.parameter_groups(toy, OptimConfig()), OptimConfig(), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused") is True
    schedule = optim.WarmupDecay(total=100, warmup=10, schedule="linear")
    assert schedule(0) == pytest.approx(1 / 11) and schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == 1.0 and schedule(55) == pytest.approx(0.5) and schedule(100) == 0.0
    cosine = optim.WarmupDecay(total=100, warmup=0, schedule="cosine", min_ratio=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    # warm-up of 10% of 20 steps = 2: the first step runs at 1/3 of each group's lr (default 5e-5)
    optim.build_scheduler(optimizer, OptimConfig(warmup_ratio=0.1), total_steps=20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 / 3)
