"""engine/ds_config.py: the resolved DeepSpeed config ("auto" filled from the run config, pitfall settings explicit)."""

from __future__ import annotations

import json

import pytest

from violet_ds.config import DataConfig, EngineConfig, OptimConfig
from violet_ds.engine import ds_config as dsc
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
    # bf16 without DeepSpeed's scan: the clipping moves to torch's fused AdamW (deepspeed_engine.NonFiniteSkip)
    moved = cfg["bf16"]["enabled"] and not cfg["bf16"]["check_grad_overflow"]
    assert cfg["gradient_clipping"] == (0.0 if moved else 0.7)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["overlap_comm"] is True
    assert "auto" not in json.dumps(cfg)
    if cfg["bf16"]["enabled"]:
        # DeepSpeed's per-gradient scan only where the optimizer cannot skip a non-finite step on the device
        assert cfg["bf16"]["check_grad_overflow"] is (name == "zero2_offload.json")
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


@pytest.mark.parametrize("optimizer,offload,expected", [("auto", False, False), ("adamw", False, False),
                                                         ("deepspeed_fused_adam", False, True),
                                                         ("auto", True, True)])
def test_bf16_overflow_scan_only_without_the_on_device_skip(tmp_path, optimizer, offload, expected):
    """`bf16.check_grad_overflow: auto` (or absent): off with torch's fused AdamW (deepspeed_engine.NonFiniteSkip
    skips a non-finite step on the device), on with DeepSpeed's optimizers; an explicit value is kept."""
    base = {"bf16": {"enabled": True, "check_grad_overflow": "auto"}}
    if offload:
        base["zero_optimization"] = {"offload_optimizer": {"device": "cpu"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base))
    cfg = dsc.resolve_ds_config(EngineConfig(ds_config=str(path)), OptimConfig(optimizer=optimizer), DataConfig(),
                                World())
    assert cfg["bf16"]["check_grad_overflow"] is expected
    cfg = dsc.resolve_ds_config(EngineConfig(ds_config=str(path), ds_overrides={"bf16": {"check_grad_overflow": True}}),
                                OptimConfig(), DataConfig(), World())
    assert cfg["bf16"]["check_grad_overflow"] is True
