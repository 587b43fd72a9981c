"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) after a checkpoint continues with
bitwise the same losses, learning rates and samples as an uninterrupted run (CPU, bf16, ZeRO-2)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine_support import (cli_command, cli_env, latest_tag, run_cli, tiny_config,
                            train_records, write_config, REPO)

MAX_STEPS = 12


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> list[dict]:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("resume_runs")
    config = write_config(tiny_config(demo, out, "reference", run__max_steps=MAX_STEPS), out / "reference.yaml")
    run_cli(config)
    records = train_records(out / "reference")
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    return records


def _interrupt(config: Path, run_dir: Path, sig: int, after_tag: str, extra: tuple = (),
               timeout: float = 240) -> subprocess.Popen:
    """Start a run, wait until `latest` names `after_tag` (or later), then send `sig`."""
    process = subprocess.Popen(cli_command(config, *extra), env=cli_env(), cwd=str(REPO), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        tag = latest_tag(run_dir)
        if tag is not None and tag >= after_tag:
            process.send_signal(sig)
            break
        if process.poll() is not None:
            break
        time.sleep(0.02)
    output, _ = process.communicate(timeout=timeout)
    process.output = output
    return process


def _assert_continues_exactly(reference: list[dict], resumed: list[dict], resumed_from: int) -> None:
    assert [r["step"] for r in resumed] == list(range(1, MAX_STEPS + 1))
    for ref, got in zip(reference, resumed):
        assert got["indices"] == ref["indices"], f"step {ref['step']}: other samples than the uninterrupted run"
        # bitwise: floats written by json round-trip exactly
        for key in ("loss", "loss_vtm", "loss_mlm", "loss_mvm", "lr"):
            assert got[key] == ref[key], f"step {ref['step']} {key}: {got[key]!r} != {ref[key]!r}"
    epochs = sorted({r["epoch"] for r in resumed})
    # the run crosses an epoch boundary; within an epoch no sample repeats
    assert len(epochs) == 2
    for epoch in epochs:
        seen = [i for r in resumed if r["epoch"] == epoch for i in r["indices"]]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample was repeated"
    assert resumed_from < MAX_STEPS


def test_sigkill_then_sigterm_then_resume_matches_uninterrupted(demo, reference, tmp_path):
    """One run interrupted twice: SIGKILL after its first checkpoint, resumed with `auto`; then SIGTERM
    (preemption: it saves and exits 0), resumed with `latest`; the end result equals the reference."""
    config = write_config(tiny_config(demo, tmp_path, "interrupted", run__max_steps=MAX_STEPS), tmp_path / "run.yaml")
    run_dir = tmp_path / "interrupted"

    killed = _interrupt(config, run_dir, signal.SIGKILL, after_tag="step00000002")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{killed.output[-2000:]}"
    killed_at = int(latest_tag(run_dir).replace("step", ""))
    assert killed_at < MAX_STEPS

    # resume after the kill, and preempt the resumed run once it saved a later checkpoint
    resumed = _interrupt(config, run_dir, signal.SIGTERM, after_tag=f"step{killed_at + 2:08d}",
                         extra=("--run.resume", "auto"))
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step{killed_at:08d}'}" in (run_dir / "log.txt").read_text()
    assert "SIGTERM received" in resumed.output, resumed.output[-3000:]
    stopped_at = int(latest_tag(run_dir).replace("step", ""))
    assert killed_at < stopped_at < MAX_STEPS, (killed_at, stopped_at)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] is True and summary["steps"] == stopped_at and summary["end"] == "preempted"

    run_cli(config, "--run.resume", "latest")
    _assert_continues_exactly(reference, train_records(run_dir), stopped_at)


def test_resume_latest_without_checkpoint_is_an_error(demo, tmp_path):
    from violet_ds.cli import main

    config = write_config(tiny_config(demo, tmp_path, "fresh"), tmp_path / "run.yaml")
    # fails before any distributed or model setup, so it runs in-process
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        main(["pretrain", "--config", str(config), "--run.resume", "latest"])


def test_interrupted_save_is_never_latest(demo, reference, tmp_path):
    """A tag dir without the completion marker (a save killed mid-way) is refused by name."""
    from violet_ds.engine.checkpoint import resolve_resume_tag

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step00000002").mkdir(parents=True)
    (checkpoints / "step00000002" / "violet_ds_complete.json").write_text('{"step": 2}')
    (checkpoints / "step00000004").mkdir()
    (checkpoints / "latest").write_text("step00000002")
    assert resolve_resume_tag(checkpoints, "auto") == "step00000002"
    with pytest.raises(RuntimeError, match="incomplete"):
        resolve_resume_tag(checkpoints, "step00000004")
