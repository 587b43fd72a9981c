"""`violet-ds bench data`: loader and decode throughput per JPEG decoder, on a synthetic TSV."""

from __future__ import annotations

import json

import torch

from violet_ds.commands.bench import bench_data
from violet_ds.data.frames import available_decoders


def test_bench_data_runs_every_decoder(tmp_path):
    out = tmp_path / "bench.json"
    torch.set_num_threads(1)
    assert bench_data(num_frames=2, size=32, batch_size=2, workers=0, batches=2, synthetic_rows=4, out=str(out)) == 0
    results = json.loads(out.read_text())
    assert set(results["decoders"]) == set(available_decoders())
    assert results["meta"]["commit"] and results["meta"]["time_utc"]
    assert all(r["loader_clips_per_s"] > 0 and r["decode_frames_per_s"] > 0 for r in results["decoders"].values())
