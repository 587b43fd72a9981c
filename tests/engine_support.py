"""Helpers for the engine / pretraining / resume tests: a small demo dataset and run configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_small_demo(root: Path) -> Path:
    """A small build of the real demo data (same code as `violet-ds make-demo-data`)."""
    from violet_ds.data.demo import make_demo_data

    out = root / "demo"
    if not (out / "demo.json").is_file():
        make_demo_data(out=str(out), num_videos=48, num_images=16, num_frames=4, size=64, workers=1)
    return out


def tiny_config(demo: Path, output_dir: Path, name: str, **changes) -> dict:
    """A pretraining run of violet-tiny on the demo data: 2 frames of 64x64, batch 4, bf16 ZeRO-2."""
    config = {
        "model": {"name": "violet-tiny", "overrides": {"vocab_size": 384, "max_frames": 4}},
        "data": {
            "train": [{"tsv": str(demo / "video_*.tsv"), "annotations": str(demo / "txt_pretrain.json"),
                       "split": "train"},
                      {"tsv": str(demo / "image_*.tsv"), "annotations": str(demo / "txt_image.json"),
                       "split": "train", "kind": "image"}],
            "tokenizer": str(demo / "tokenizer"), "num_frames": 2, "image_size": 64, "max_text_len": 16,
            "batch_size": 4, "num_workers": 0, "pin_memory": False},
        "task": {"name": "pretrain", "loss_weights": {"vtm": 1.0, "mlm": 1.0, "mvm": 1.0},
                 "mvm_targets": {"pixel": 1.0}, "mvm_strategies": ["rm", "bm"], "mvm_ratio": 0.25},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "engine": {"ds_config": str(REPO / "ds_configs" / "cpu_test.json"), "seed": 7},
        "run": {"name": name, "output_dir": str(output_dir), "max_steps": 8, "log_every": 1,
                "save_every": 2, "image_every": 0, "progress": False, "log_sample_indices": True},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__", 1)
        config[section][key] = value
    return config


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def cli_command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "violet_ds.cli", "pretrain", "--config", str(config_path), *extra]


NONFINITE_CLI = REPO / "tests" / "nonfinite_cli.py"


def nonfinite_command(config_path: Path, steps: str, *extra: str) -> list[str]:
    """`cli_command` through tests/nonfinite_cli.py: the divergence guard sees a NaN loss at `steps` ("5,6", or
    "5,6@1" for rank 1 only)."""
    return [sys.executable, str(NONFINITE_CLI), "--nonfinite", steps, "pretrain", "--config", str(config_path), *extra]


def run_cli(config_path: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cli_command(config_path, *extra), env=cli_env(), capture_output=True, text=True,
                            timeout=timeout, cwd=str(REPO))
    assert result.returncode == 0, f"violet-ds failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run under tmp_path/runs/ (its lock left behind), to change without touching it."""
    target = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, target)
    (target / "run.lock").unlink(missing_ok=True)
    return target


def train_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl training records (one per logged step), in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") is None and "loss" in r]


def latest_tag(run_dir: Path) -> Optional[str]:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None
