"""Engine pieces without a training run: ds_config resolution, parameter groups, LR schedule, optimizer, RNG."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from violet_ds.config import DataConfig, EngineConfig, OptimConfig
from violet_ds.engine import checkpoint as ckpt
from violet_ds.engine import deepspeed_engine as dse
from violet_ds.engine import ds_config as dsc
from violet_ds.engine import optim
from violet_ds.engine.distributed import World


def _resolve(tmp_path, base: dict, world_size: int = 1, **engine):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    return dsc.resolve_ds_config(EngineConfig(ds_config=str(path), **engine), OptimConfig(grad_clip=0.5),
                                 DataConfig(batch_size=6), World(world_size=world_size))


@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero2_fp16.json", "zero2_offload.json", "cpu_test.json"])
def test_shipped_configs_resolve_with_explicit_pitfall_settings(name):
    cfg = dsc.resolve_ds_config(EngineConfig(ds_config=f"ds_configs/{name}", grad_accum=4), OptimConfig(grad_clip=0.7),
                                DataConfig(batch_size=3), World(world_size=2))
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 3 * 4 * 2
    assert cfg["gradient_clipping"] == 0.7
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["overlap_comm"] is True
    assert "auto" not in json.dumps(cfg)
    if cfg["bf16"]["enabled"]:
        assert cfg["bf16"]["check_grad_overflow"] is True
    assert dsc.optimizer_offloaded(cfg) == (name == "zero2_offload.json")


def test_ds_config_contradiction_and_optimizer_block_are_errors(tmp_path):
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 contradicts"):
        _resolve(tmp_path, {"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(ValueError, match="optimizer"):
        _resolve(tmp_path, {"optimizer": {"type": "Adam"}})
    cfg = _resolve(tmp_path, {"bf16": {"enabled": True}}, precision="fp32", zero_stage=1,
                   ds_overrides={"zero_optimization": {"reduce_bucket_size": 123}})
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123}
    assert dsc.precision_of(cfg) == "fp32"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        dsc.resolve_ds_config(EngineConfig(ds_config="nope.json"), OptimConfig(), DataConfig(), World())


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


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
