"""A resume takes weights, optimizer moments, step, data position and RNG from the checkpoint, and the LR
schedule and AdamW settings from its own config: a changed run length, learning rate, warm-up or schedule is
applied from the resumed step and logged `old -> new`, never silently dropped. The divergence advice names
a command that works, and a universal checkpoint says whether its resume is exact."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from engine_support import REPO, cli_command, cli_env, nonfinite_command, tiny_config, train_records, write_config
from violet_ds.config import OptimConfig
from violet_ds.engine import optim


def _run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


# ----------------------------------------------------------------------------------------- the schedule, in-process
def _scheduler(config: OptimConfig, total: int):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = optim.parameter_groups(module, config)
    optimizer = optim.build_optimizer(groups, config, torch.device("cpu"))
    return module, optimizer, optim.build_scheduler(optimizer, config, total)


def _trained_state(config: OptimConfig, total: int, steps: int) -> tuple[dict, dict]:
    module, optimizer, scheduler = _scheduler(config, total)
    for _ in range(steps):
        module(torch.ones(2, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


def _resumed(saved: tuple[dict, dict], config: OptimConfig, total: int):
    """A fresh optimizer + schedule of `config`, its settings taken, then the checkpoint loaded and applied."""
    _, optimizer, scheduler = _scheduler(config, total)
    configured = optim.optimizer_settings(scheduler)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    return optimizer, scheduler, optim.apply_settings(scheduler, configured)


def test_unchanged_config_leaves_the_loaded_schedule_untouched():
    config = OptimConfig(lr=1e-3, warmup_steps=1, optimizer="adamw")
    saved = _trained_state(config, total=4, steps=3)
    optimizer, scheduler, changes = _resumed(saved, config, total=4)
    assert changes == []
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in saved[0]["param_groups"]]
    assert scheduler.state_dict()["lr_lambdas"] == saved[1]["lr_lambdas"]


def test_longer_run_and_new_settings_follow_the_current_config():
    old = OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.01, optimizer="adamw")
    saved = _trained_state(old, total=4, steps=4)
    assert saved[0]["param_groups"][0]["lr"] == 0.0  # the old schedule ends at lr 0
    new = OptimConfig(lr=5e-4, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.05,
                      optimizer="adamw")
    optimizer, scheduler, changes = _resumed(saved, new, total=10)
    assert "optim.lr 0.001 -> 0.0005" in changes
    assert "total steps (run.max_steps / run.epochs) 4 -> 10" in changes
    assert "warm-up steps (optim.warmup_steps / optim.warmup_ratio) 1 -> 2" in changes
    assert "optim.schedule linear -> cosine" in changes and "optim.min_lr_ratio 0 -> 0.1" in changes
    assert "optim.weight_decay 0.01 -> 0.05" in changes
    assert any(change.startswith("lr of the next step 0 -> ") for change in changes), changes
    # the LR of every later step is the new schedule's at that step, as if the run had been configured so
    reference = optim.WarmupDecay(10, 2, "cosine", 0.1)
    for step in range(4, 10):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(5e-4 * reference(step), rel=1e-12)
            assert group["lr"] > 0
        optimizer.step()
        scheduler.step()
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    # a later save carries the new schedule
    assert scheduler.state_dict()["lr_lambdas"][0]["total"] == 10


# ----------------------------------------------------------------------------------------- end to end
def _lr_of_step(records: list[dict], step: int) -> float:
    return next(r["lr"] for r in records if r["step"] == step)


@pytest.mark.slow
def test_resume_with_more_steps_and_a_new_lr_applies_both(demo, tmp_path):
    """4 steps (the schedule reaches lr 0), then resumed to 7 with another optim.lr: steps 5..7 train at the LRs
    of a 7-step schedule of the new lr, and the log says what came from where."""
    config = write_config(tiny_config(demo, tmp_path, "longer", run__max_steps=4, run__save_every=2),
                          tmp_path / "run.yaml")
    _ok(_run(cli_command(config)))
    run_dir = tmp_path / "longer"
    assert _lr_of_step(train_records(run_dir), 4) > 0 and json.loads(
        (run_dir / "summary.json").read_text())["steps"] == 4
    output = _ok(_run(cli_command(config, "--run.resume", "auto", "--run.max_steps", "7", "--optim.lr", "2e-3")))
    log = (run_dir / "log.txt").read_text()
    line = next(line for line in log.splitlines() if "resume: from the checkpoint" in line)
    assert "weights, optimizer moments, step 4, data position, RNG streams" in line, line
    assert "optim.lr 0.001 -> 0.002" in line and "total steps (run.max_steps / run.epochs) 4 -> 7" in line, line
    assert "lr of the next step 0 -> " in line, line
    assert "resume: from the checkpoint" in output
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    schedule = optim.WarmupDecay(7, 2)
    for step in (5, 6, 7):
        # the LR of optimizer step s is the schedule's at s - 1
        assert _lr_of_step(records, step) == pytest.approx(2e-3 * schedule(step - 1), rel=1e-6)
        assert _lr_of_step(records, step) > 0


@pytest.mark.slow
def test_divergence_advice_names_commands_that_work(demo, tmp_path):
    """With a good checkpoint: resume it with half the lr (applied, logged). Without: start over with it."""
    config = write_config(tiny_config(demo, tmp_path, "nan", run__max_steps=6, run__save_every=1,
                                      run__log_every=1), tmp_path / "run.yaml")
    run_dir = tmp_path / "nan"
    # steps 3..5 report a non-finite loss: step 1 is the last good checkpoint (step 2's weights made step 3's)
    diverged = _run(nonfinite_command(config, "3,4,5"))
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    advice = f"violet-ds pretrain --config {run_dir} --run.resume step00000001 --optim.lr 0.0005"
    assert advice in diverged.stderr, diverged.stderr[-3000:]
    command = shlex.split(advice)
    resumed = _ok(_run([sys.executable, "-m", "violet_ds.cli", *command[1:], "--run.max_steps", "3"]))
    assert "optim.lr 0.001 -> 0.0005" in resumed, resumed[-3000:]
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert _lr_of_step(records, 2) == pytest.approx(5e-4 * optim.WarmupDecay(3, 2)(1), rel=1e-6)

    # no good checkpoint: the advice starts the run over, and that command works too
    bad = tiny_config(demo, tmp_path, "nan0", run__max_steps=4, run__save_every=1, run__log_every=1)
    bad["optim"]["lr"] = 1e10
    config = write_config(bad, tmp_path / "bad.yaml")
    diverged = _run(cli_command(config, "--run.max_bad_steps", "1"))
    assert diverged.returncode == 1 and "No good checkpoint" in diverged.stderr, diverged.stderr[-3000:]
    assert "--run.resume step" not in diverged.stderr and "<tag>" not in diverged.stderr
    found = re.search(r"Start it over with half the learning rate \(this deletes its checkpoints\): (violet-ds [^(]+)",
                      diverged.stderr)
    assert found, diverged.stderr[-3000:]
    command = shlex.split(found.group(1))
    assert command[1:] == ["pretrain", "--config", str(tmp_path / "nan0"), "--run.overwrite", "true",
                           "--optim.lr", "5e+09"], command
    _ok(_run([sys.executable, "-m", "violet_ds.cli", *command[1:], "--run.max_steps", "1"]))


# ----------------------------------------------------------------------------------------- universal
@pytest.mark.slow
def test_universal_same_world_resumes_exactly_and_says_where_latest_went(demo, tmp_path):
    from violet_ds.engine import checkpoint as ckpt

    config = write_config(tiny_config(demo, tmp_path, "ref", run__max_steps=4, run__save_every=2),
                          tmp_path / "run.yaml")
    _ok(_run(cli_command(config)))
    reference = train_records(tmp_path / "ref")
    chain = tmp_path / "chain"
    shutil.copytree(tmp_path / "ref", chain)
    (chain / "checkpoints" / "latest").write_text("step00000002")
    out = _ok(_run([sys.executable, "-m", "violet_ds.cli", "universal-checkpoint", "--run_dir", str(chain)]))
    assert "latest            moved: step00000002 -> step00000002-universal" in out, out
    assert "resume            exact: the RNG streams of every rank are copied (same world size)" in out, out
    universal = chain / "checkpoints" / "step00000002-universal"
    assert ckpt.rng_file(universal, 0).is_file()

    chain_config = write_config(tiny_config(demo, tmp_path, "chain", run__max_steps=4, run__save_every=2),
                                tmp_path / "chain.yaml")
    output = _ok(_run(cli_command(chain_config, "--run.resume", "auto")))
    assert ("resumed from " + str(universal) + ": step 2, epoch 0, 2 micro-batches into the epoch (a universal "
            "checkpoint, converted from step00000002 of 1 rank(s))") in output, output[-3000:]
    assert "not an exact continuation" not in output
    continued = train_records(chain)
    assert [r["step"] for r in continued] == [1, 2, 3, 4]
    for ref, got in zip(reference[2:], continued[2:]):
        assert got["indices"] == ref["indices"]
        for key in ("loss", "loss_vtm", "loss_mlm", "loss_mvm", "lr"):
            assert got[key] == ref[key], (ref["step"], key, got[key], ref[key])

    # without the ranks' RNG files (converted for another world size) the resume says it is not exact
    warnings: list[str] = []
    marker = json.loads((universal / ckpt.COMPLETE_MARKER).read_text())
    marker["source_world_size"] = 2
    (universal / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    ckpt.rng_file(universal, 0).unlink()
    ckpt.check_resume(chain / "checkpoints", universal.name, (chain / "config.yaml").read_text(), 1, False,
                      warnings.append)
    assert warnings == [
        "resuming the universal checkpoint step00000002-universal is not an exact continuation: converted from 2 "
        "rank(s) to 1, the RNG streams could not move; masking and dropout draws restart from engine.seed "
        "(weights, optimizer and data position are exact)"]


def test_universal_without_set_latest_leaves_latest_and_says_so(tmp_path, monkeypatch, capsys):
    """The conversion itself is DeepSpeed's (tested above); here only the `latest` and exactness lines."""
    from violet_ds.commands.models import universal_checkpoint
    from violet_ds.engine import checkpoint as ckpt
    from violet_ds.engine import universal

    checkpoints = tmp_path / "checkpoints"
    source = checkpoints / "step00000002"
    source.mkdir(parents=True)
    config = "data: {batch_size: 2}\nengine: {grad_accum: 1}\n"
    torch.save({"step": 2, "epoch": 0, "micro_in_epoch": 2, "world_size": 1, "config": config},
               source / ckpt.MODEL_STATES)
    (source / ckpt.COMPLETE_MARKER).write_text(json.dumps({"tag": "step00000002", "step": 2, "world_size": 1}))
    ckpt.write_latest(checkpoints, "step00000002")

    def fake_conversion(src, output, workers):
        output.mkdir()
        shutil.copy(src / ckpt.MODEL_STATES, output / ckpt.MODEL_STATES)

    monkeypatch.setattr(universal, "_run_ds_to_universal", fake_conversion)
    assert universal_checkpoint(str(tmp_path), world_size=2, batch_size=1, set_latest=False) == 0
    out = capsys.readouterr().out
    assert ckpt.read_latest(checkpoints) == "step00000002"
    assert ("latest            unchanged (step00000002); resume the converted tag with --run.resume "
            "step00000002-universal") in out, out
    assert "resume            not exact: the RNG streams of 1 rank(s) cannot move to 2" in out, out
    assert "--run.resume step00000002-universal" in out.splitlines()[-2], out
