"""`violet-ds bench targets`: time per clip of each MVM teacher (random teachers, no downloads)."""

from __future__ import annotations

import json

import pytest

from violet_ds.commands.bench import bench_targets


def test_bench_targets_command(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_targets(targets=["pixel", "hog"], num_frames=2, size=64, warmup=0, repeats=1, output=str(out)) == 0
    result = json.loads(out.read_text())
    assert [r["target"] for r in result["results"]] == ["pixel", "hog"]
    assert all(r["ms_per_clip"] > 0 and r["teacher_params_m"] == 0 for r in result["results"])
    assert "| hog | dense |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown targets"):
        bench_targets(targets=["pixels"])
