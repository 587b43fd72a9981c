"""CUDA paths (skipped without a GPU; `tools/gpu_check.sh` runs them on one)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_violet_tiny_bf16_autocast_matches_fp32():
    from violet_ds.models import create_model

    torch.manual_seed(0)
    model = create_model("violet-tiny").cuda().eval()
    video = torch.randn(2, 2, 3, 64, 64, device="cuda")
    ids = torch.randint(1000, 2000, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model(video, ids, mask).hidden.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(video, ids, mask).hidden.float()
    assert torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits: compare relative to the activations' scale
    assert (low - reference).abs().max() / reference.abs().max() < 0.05


@pytest.mark.parametrize("precision,ds_config,optimizer", [
    ("bf16", "ds_configs/zero2_bf16.json", "auto"),
    ("fp16", "ds_configs/zero2_fp16.json", "auto"),
    ("bf16", "ds_configs/zero2_bf16.json", "deepspeed_fused_adam"),
])
def test_engine_step_on_cuda(precision, ds_config, optimizer, monkeypatch):
    """A ZeRO-2 pretraining step through the real engine, in a fresh process on the CUDA accelerator
    (conftest pins DeepSpeed to the CPU one): finite loss, the optimizer asked for."""
    from violet_ds.bench.train import measure_step, run_in_child

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    row = run_in_child(measure_step, {"model": "violet-tiny", "batch_size": 2, "frames": 2, "image_size": 64, "text_len": 16,
                    "checkpointing": True, "steps": 2, "warmup": 1, "precision": precision, "ds_config": ds_config,
                    "tokenizer": None, "strategies": ["rm", "bm"], "threads": 2, "optimizer": optimizer}, timeout_s=600)
    assert math.isfinite(row["loss"])
    assert row["device"].startswith("cuda") and row["precision"] == precision
    expected = {"auto": "AdamW", "deepspeed_fused_adam": "FusedAdam"}[optimizer]
    assert row["optimizer"] == expected
    assert row["peak_memory_mb"] > 0
