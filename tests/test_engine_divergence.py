"""engine/divergence.py: a diverged run stops (or rolls back) and never saves non-finite weights; the streak logic.

Non-finite losses at chosen steps come from tests/nonfinite_cli.py (the CLI with the guard's `loss_fault` test hook).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from engine_support import REPO, cli_command, cli_env, nonfinite_command, tiny_config, write_config


def _run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run_command(cli_command(config, *extra))


def _run_command(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600, cwd=str(REPO))


# ----------------------------------------------------------------------------------------- divergence
def test_diverged_run_stops_without_saving_nonfinite_weights(demo, tmp_path):
    config = tiny_config(demo, tmp_path, "diverged", run__max_steps=8, run__save_every=1, run__log_every=2)
    config["optim"]["lr"] = 1e10
    result = _run(write_config(config, tmp_path / "run.yaml"))
    assert result.returncode == 1, result.stdout[-2000:]
    assert "the run diverged" in result.stderr and "No good checkpoint" in result.stderr, result.stderr[-2000:]
    checkpoints = tmp_path / "diverged" / "checkpoints"
    # step 1's weights (lr 1e10) produced step 2's NaN: kept only with a divergence note, never `latest`
    assert not (checkpoints / "latest").exists()
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000001"]
    assert (checkpoints / "step00000001" / "violet_ds_diverged.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "diverged" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "diverged" and records[-1]["first_bad_step"] == 2
    # summary.json is written by the stopped run too, with why it ended and the divergence report
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["end"] == "diverged" and "the run diverged" in summary["error"] and summary["checkpoint"] is None
    assert summary["divergence"]["bad_steps"] >= 2


def test_rollback_reloads_the_last_good_checkpoint_and_skips_the_window(demo, tmp_path):
    config = tiny_config(demo, tmp_path, "rollback", run__max_steps=8, run__save_every=2, run__log_every=1,
                         run__on_divergence="rollback", run__max_rollbacks=2, run__max_bad_steps=2)
    # steps 5 and 6 report a non-finite loss once (fault injection); the run must roll back to step 2
    # (step 4's weights produced step 5's loss) and continue after the data it had reached
    result = _run_command(nonfinite_command(write_config(config, tmp_path / "run.yaml"), "5,6"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "rollback"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["from_step"] == 6 and events[0]["to_step"] == 2
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8]
    indices = [i for r in records if "indices" in r for i in r["indices"]]
    first_epoch = [i for r in records if r.get("epoch") == 0 and "indices" in r for i in r["indices"]]
    assert len(first_epoch) == len(set(first_epoch)), "a rolled-back data window was trained on again"
    assert len(indices) == 12 * 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["divergence"]["rollbacks"][0]["tag"] == "step00000002"
    assert summary["bad_samples"]["bad"] == 0 and summary["bad_samples"]["seen"] > 0


def test_guard_streak_logic():
    from violet_ds.engine.distributed import World
    from violet_ds.engine.divergence import DivergenceGuard, last_good_step

    guard = DivergenceGuard(3, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    for step, loss in enumerate([1.0, float("nan"), float("inf"), 2.0, float("nan")], start=1):
        guard.observe(torch.tensor(loss))
        guard.end_step(step)
    verdict = guard.check()
    assert not verdict.diverged and verdict.bad_steps == 3 and verdict.streak == 1 and verdict.first_bad_step == 5
    for step in (6, 7):
        guard.observe(torch.tensor(float("nan")))
        guard.end_step(step)
    verdict = guard.check()
    assert verdict.diverged and verdict.first_bad_step == 5
    assert last_good_step([1, 2, 3, 4], 5) == 3 and last_good_step([4], 5) is None


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_nonfinite_loss_on_one_rank_rolls_back_every_rank(demo, tmp_path):
    from violet_ds.engine.distributed import free_port

    port = free_port()
    config = write_config(tiny_config(demo, tmp_path, "two", run__max_steps=8, run__save_every=2, run__log_every=2,
                                      run__on_divergence="rollback", run__max_bad_steps=2), tmp_path / "two.yaml")
    command = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               *nonfinite_command(config, "5,6@1")[1:]]
    result = subprocess.run(command, env=cli_env(), cwd=str(REPO),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    # only rank 1 saw the non-finite loss; rank 0 (which writes metrics) rolled back with it
    assert len(rollbacks) == 1 and rollbacks[0]["from_step"] == 6 and rollbacks[0]["to_step"] == 2, rollbacks
    assert [r["step"] for r in records if "loss" in r][-1] == 8
