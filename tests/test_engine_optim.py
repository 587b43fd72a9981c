"""engine/optim.py (parameter groups, optimizer, LR schedule) and the frozen-teacher check of engine/deepspeed_engine.py."""

from __future__ import annotations

import pytest
import torch
from deepspeed.utils import groups as ds_groups
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


class _Regression(nn.Module):
    """A task as the engine sees one: batch in, {"loss"} out."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 1)

    def forward(self, batch):
        x = batch["x"].to(self.first.weight.dtype)
        return {"loss": (self.second(torch.relu(self.first(x))).float().squeeze(-1) - batch["y"]).square().mean()}


def _bf16_engine(scan: bool = False):
    from violet_ds.commands.run import setup_world
    from violet_ds.config import DataConfig, EngineConfig
    from violet_ds.engine.ds_config import resolve_ds_config

    engine_cfg = EngineConfig(ds_config="cpu_test.json", precision="bf16",
                              ds_overrides={"bf16": {"check_grad_overflow": True}} if scan else {})
    world = setup_world(engine_cfg)
    # DeepSpeed caches a clone of the world group per process; an earlier test of this pytest process may have
    # destroyed the group it cloned
    ds_groups._WORLD_GROUP = None
    torch.manual_seed(0)
    task = _Regression()
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.1, weight_decay=0.0)
    ds_config = resolve_ds_config(engine_cfg, optim_cfg, DataConfig(batch_size=4), world)
    engine, optimizer, _, _ = dse.initialize(task, ds_config, optim_cfg, total_steps=10, world=world)
    generator = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(4, 8, generator=generator), "y": torch.randn(4, generator=generator)}
    return engine, optimizer, task, ds_config, batch


def _train_step(engine, batch, poison=None):
    handle = poison.register_hook(lambda grad: grad.clone().fill_(float("nan"))) if poison is not None else None
    engine.backward(engine(batch)["loss"])
    if handle is not None:
        handle.remove()
    engine.step()


def test_bf16_step_with_a_nan_gradient_is_skipped_on_the_device():
    """bf16 ZeRO-2 with torch's fused AdamW: DeepSpeed's per-gradient overflow scan is off, and a step whose
    global gradient norm is not finite changes nothing (weights, Adam moments, step count) and is counted; the
    next finite step trains on. Without the skip the NaN reaches the weights: the next loss is NaN, which only the
    divergence guard would then see."""
    from violet_ds.bench.train import OpCounter

    engine, optimizer, task, ds_config, batch = _bf16_engine()
    assert ds_config["bf16"]["check_grad_overflow"] is False and engine.nonfinite_skip is not None
    _train_step(engine, batch)
    client = optimizer.optimizer
    state = lambda: [t.clone() for p in client.param_groups[0]["params"]  # noqa: E731
                     for t in (p, client.state[p]["exp_avg"], client.state[p]["step"])]
    weights = lambda: [p.detach().clone() for p in task.parameters()]  # noqa: E731
    before_state, before_weights = state(), weights()
    counter = OpCounter()
    with counter:
        _train_step(engine, batch, poison=task.first.weight)
    assert counter.ops["amax"] == 0  # no per-gradient scan (DeepSpeed's has_inf_or_nan reduces with amax/amin)
    assert not torch.isfinite(engine.get_global_grad_norm())
    for after, expected in zip(state(), before_state):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)
    for after, expected in zip(weights(), before_weights):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert engine.nonfinite_skip.skipped_steps() == 1
    assert dse.skipped_steps(engine) == 1  # what the trainer logs as train/skipped_steps
    _train_step(engine, batch)
    assert all(torch.isfinite(p).all() for p in task.parameters())
    assert not torch.equal(weights()[0], before_weights[0]) and engine.nonfinite_skip.skipped_steps() == 1

    engine.nonfinite_skip.remove()
    _train_step(engine, batch, poison=task.first.weight)
    assert not torch.isfinite(task.first.weight).all()
    assert not torch.isfinite(engine(batch)["loss"])


def test_clipping_in_the_fused_kernel_equals_deepspeeds():
    """bf16 without the scan: DeepSpeed's `gradient_clipping` is 0 and the fused AdamW divides the gradients by
    DeepSpeed's clip factor (`grad_scale`, no host read); the weights after clipped steps equal those of DeepSpeed's
    own clipping (scan on)."""
    from violet_ds.bench.train import OpCounter

    engine, _, task, ds_config, batch = _bf16_engine()
    assert ds_config["gradient_clipping"] == 0.0 and engine.nonfinite_skip.max_norm == pytest.approx(0.1)
    counter = OpCounter()
    with counter:
        for _ in range(3):
            _train_step(engine, batch)
    assert counter.syncs == {}  # no host read in forward, backward or step
    assert float(engine.get_global_grad_norm()) > 0.1  # the steps were clipped
    ours = [p.detach().float().clone() for p in task.parameters()]
    engine, _, task, ds_config, batch = _bf16_engine(scan=True)
    assert ds_config["gradient_clipping"] == pytest.approx(0.1)
    for _ in range(3):
        _train_step(engine, batch)
    for mine, deepspeeds in zip(ours, task.parameters()):
        torch.testing.assert_close(mine, deepspeeds.detach().float(), rtol=0, atol=0)
