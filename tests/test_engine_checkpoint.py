"""engine/checkpoint.py: safe loading (no code runs from a checkpoint), the resume checks, `latest` and the
completion marker, RNG state files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from violet_ds.engine import checkpoint as ckpt

from engine_support import REPO, cli_command, cli_env, copy_run, tiny_config, write_config


class _Payload:
    """Unpickling this creates `marker`: stands for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    """Rewrite a checkpoint file with its original content plus a code-running object."""
    from violet_ds.engine.checkpoint import safe_load

    original = safe_load(path)  # the untampered file must itself pass the safe loader
    if isinstance(original, dict):
        original["extra"] = _Payload(marker)
    else:
        original = {"state": original, "extra": _Payload(marker)}
    torch.save(original, path)


def _run(config: Path, *extra: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(config, *extra), env={**cli_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


# ----------------------------------------------------------------------------------------- safe loading
@pytest.mark.parametrize("pattern", ["mp_rank_00_model_states.pt", "*optim_states.pt", "rng_rank00000.pt"])
def test_pickle_payload_in_any_checkpoint_file_is_refused(finished, tmp_path, pattern):
    from violet_ds.engine import checkpoint as ckpt

    run_dir = copy_run(finished[1], tmp_path)
    tag_dir = run_dir / "checkpoints" / "step00000002"
    target = next(tag_dir.glob(pattern))
    marker = tmp_path / "MARKER"
    _poison(target, marker)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=target.name) as info:
        ckpt.check_tag_dir(tag_dir)
    assert "posix.system" in str(info.value) or "system" in str(info.value)
    assert not marker.exists()


def test_a_plain_pickle_payload_is_refused_naming_its_global(tmp_path):
    """Not torch's zip format (a raw pickle, as a hand-made hostile file would be): the refusal names the global
    from a scan of the opcodes, and nothing runs."""
    import pickle

    from violet_ds.engine import checkpoint as ckpt

    marker = tmp_path / "MARKER"
    target = tmp_path / "mp_rank_00_model_states.pt"
    target.write_bytes(pickle.dumps({"module": _Payload(marker)}, protocol=4))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused globals: posix.system"):
        ckpt.safe_load(target)
    assert not marker.exists()


def test_export_init_from_and_universal_refuse_a_payload(finished, tmp_path):
    from violet_ds.engine import checkpoint as ckpt
    from violet_ds.commands.export import export
    from violet_ds.engine.export import read_weights
    from violet_ds.engine.universal import universal_checkpoint

    run_dir = copy_run(finished[1], tmp_path)
    marker = tmp_path / "MARKER"
    _poison(next((run_dir / "checkpoints" / "step00000002").glob("*optim_states.pt")), marker)
    with pytest.raises(ckpt.UnsafeCheckpointError):
        export(str(run_dir), output=str(tmp_path / "out.safetensors"))
    with pytest.raises(ckpt.UnsafeCheckpointError):
        read_weights(run_dir)  # the path of --run.init_from <run dir>
    with pytest.raises(ckpt.UnsafeCheckpointError):
        universal_checkpoint(str(run_dir))
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_resume_refuses_a_payload_in_one_line(finished, tmp_path):
    config, source = finished
    run_dir = copy_run(source, tmp_path)
    marker = tmp_path / "MARKER"
    _poison(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt", marker)
    result = _run(config, "--run.output_dir", str(run_dir.parent), "--run.resume", "latest", "--run.max_steps", "3")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert not marker.exists()
    assert "mp_rank_00_model_states.pt: refused to load" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_clean_checkpoints_still_load(finished):
    from violet_ds.engine import checkpoint as ckpt

    assert ckpt.check_tag_dir(finished[1] / "checkpoints" / "step00000002") == 3


# ----------------------------------------------------------------------------------------- resume checks
def test_latest_outside_the_run_dir_is_refused(finished, tmp_path):
    from violet_ds.engine import checkpoint as ckpt

    run_dir = copy_run(finished[1], tmp_path)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest").write_text("../../other/checkpoints/step00000002")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint folder inside"):
        ckpt.resolve_resume_tag(checkpoints, "auto")
    (checkpoints / "evil").symlink_to(tmp_path)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve_resume_tag(checkpoints, "evil")


def _config_text(run_dir: Path, **changes) -> str:
    from violet_ds.engine import checkpoint as ckpt

    states = ckpt.safe_load(run_dir / "checkpoints" / "step00000002" / ckpt.MODEL_STATES)
    config = yaml.safe_load(states["config"])
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return yaml.safe_dump(config)


def test_resume_checks_name_each_difference(finished, tmp_path):
    from violet_ds.engine import checkpoint as ckpt

    run_dir = copy_run(finished[1], tmp_path)
    checkpoints = run_dir / "checkpoints"
    same = _config_text(run_dir)
    assert ckpt.check_resume(checkpoints, "step00000002", same, 1, allow=False, warn=print) == []
    changed = _config_text(run_dir, data__batch_size=8, engine__seed=1)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.check_resume(checkpoints, "step00000002", changed, 1, allow=False, warn=print)
    assert "data.batch_size: 4 in the checkpoint, 8 now" in str(info.value)
    assert "engine.seed: 7 in the checkpoint, 1 now" in str(info.value)
    assert "--run.allow_inexact_resume" in str(info.value)
    warnings: list[str] = []
    problems = ckpt.check_resume(checkpoints, "step00000002", changed, 1, allow=True, warn=warnings.append)
    assert len(problems) == 2 and len(warnings) == 2
    with pytest.raises(ckpt.CheckpointError, match="world size 1 in the checkpoint, 2 now"):
        ckpt.check_resume(checkpoints, "step00000002", same, 2, allow=True, warn=print)
    data_list = yaml.safe_load(same)
    data_list["data"]["train"] = data_list["data"]["train"][:1]
    with pytest.raises(ckpt.CheckpointError, match="data.train"):
        ckpt.check_resume(checkpoints, "step00000002", yaml.safe_dump(data_list), 1, allow=False, warn=print)


def test_missing_rng_optimizer_or_model_file(finished, tmp_path):
    from violet_ds.engine import checkpoint as ckpt

    run_dir = copy_run(finished[1], tmp_path)
    checkpoints, tag_dir = run_dir / "checkpoints", run_dir / "checkpoints" / "step00000002"
    same = _config_text(run_dir)
    (tag_dir / "rng_rank00000.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match="rng_rank00000.pt missing"):
        ckpt.check_resume(checkpoints, "step00000002", same, 1, allow=False, warn=print)
    next(tag_dir.glob("*optim_states.pt")).unlink()
    with pytest.raises(ckpt.CheckpointError, match="optim_states.pt missing.*step00000001"):
        ckpt.check_resume(checkpoints, "step00000002", same, 1, allow=True, warn=print)
    (tag_dir / ckpt.MODEL_STATES).unlink()
    with pytest.raises(ckpt.CheckpointError, match="mp_rank_00_model_states.pt"):
        ckpt.check_resume(checkpoints, "step00000002", same, 1, allow=True, warn=print)


# ----------------------------------------------------------------------------------------- latest, RNG files
def test_resume_latest_without_checkpoint_is_an_error(demo, tmp_path):
    from violet_ds.cli import main

    config = write_config(tiny_config(demo, tmp_path, "fresh"), tmp_path / "run.yaml")
    # fails before any distributed or model setup, so it runs in-process
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        main(["pretrain", "--config", str(config), "--run.resume", "latest"])


def test_interrupted_save_is_never_latest(tmp_path):
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


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
