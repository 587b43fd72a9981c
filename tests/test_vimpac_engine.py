"""VIMPAC through the real engine (`violet-ds pretrain` then `violet-ds finetune --run.init_from`) on a tiny
VQ-token dataset: DeepSpeed ZeRO-2 on CPU, the tasks' dataset hooks, weights carried from pretraining."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from engine_support import REPO, cli_env

from violet_ds.data.vq_clips import write_vq_tsv

TINY = dict(hidden_size=16, num_layers=1, num_heads=4, head_dim=4, mlp_size=32, frames=3, height=4, width=4)


def _run(command: str, config: dict, path, *extra: str) -> dict:
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "violet_ds.cli", command, "--config", str(path), *extra],
                            env=cli_env(), capture_output=True, text=True, timeout=400, cwd=str(REPO))
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.slow
def test_pretrain_then_finetune_through_the_engine(tmp_path, bert_dir):
    rng = np.random.default_rng(0)
    videos = {f"v{i}": rng.integers(0, 50, (int(rng.integers(2, 7)), 4, 4)) for i in range(24)}
    write_vq_tsv(tmp_path / "vq.tsv", videos.items())
    labels = {"train": [{"video": f"v{i}", "label": i % 3} for i in range(16)],
              "val": [{"video": f"v{i}", "label": i % 3} for i in range(16, 24)], "labels": ["a", "b", "c"]}
    (tmp_path / "action.json").write_text(json.dumps(labels))

    def source(split):
        return {"tsv": "not_read.tsv", "vq": str(tmp_path / "vq.tsv"), "annotations": str(tmp_path / "action.json"),
                "split": split}

    base = {
        "model": {"name": "vimpac-small", "overrides": TINY},
        "data": {"train": [source("train")], "val": [source("val")], "tokenizer": str(bert_dir), "num_frames": 3,
                 "batch_size": 4, "num_workers": 0, "pin_memory": False, "eval_clips": 2},
        "optim": {"optimizer": "adamw", "lr": 1e-3},
        "engine": {"ds_config": "ds_configs/cpu_test.json", "precision": "fp32"},
        "run": {"output_dir": str(tmp_path / "runs"), "max_steps": 3, "eval_every": 3, "progress": False, "image_every": 0},
    }
    pretrain = dict(base, task={"name": "vimpac_pretrain", "options": {"contrastive_hidden": 32,
                                                                         "contrastive_out": 8}})
    pretrain["run"] = dict(base["run"], name="pre")
    _run("pretrain", pretrain, tmp_path / "pre.yaml")
    summary = json.loads((tmp_path / "runs" / "pre" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val"]["mask_acc"] >= 0.0 and "contrastive_acc" in summary["val"]

    finetune = dict(base, task={"name": "vimpac_action", "num_classes": 3, "options": {"eval_crops": 1}})
    finetune["run"] = dict(base["run"], name="ft", init_from=str(tmp_path / "runs" / "pre"))
    _run("finetune", finetune, tmp_path / "ft.yaml")
    log = (tmp_path / "runs" / "ft" / "log.txt").read_text()
    assert "newly initialised: ['heads.classifier.linear.bias', 'heads.classifier.linear.weight']" in log
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["val"]["count"] == 8 and 0.0 <= summary["val"]["acc"] <= 1.0
