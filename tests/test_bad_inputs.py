"""Bad values and bad files are one line naming the setting or the file and key, found before heavy work.

Value bounds of the run configuration, the training commands' checks before torch is imported, an unreadable
run.lock, every `.lineidx` offset in the preflight, extraction settings recorded next to the shards, model
directories with bad config.json values or truncated weights, incomplete checkpoint tags, YAML tags in a run's
config.yaml, and an unwritable retrieval feature cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_support import cli_env

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ value bounds
@pytest.mark.parametrize("section, values, message", [
    ("run", {"max_steps": -5}, r"--run.max_steps: must be >= 1, got -5"),
    ("run", {"max_steps": 0}, r"--run.max_steps: must be >= 1"),
    ("run", {"epochs": 0}, r"--run.epochs: must be >= 1"),
    ("data", {"max_text_len": 0}, r"--data.max_text_len: must be >= 3, got 0"),
    ("data", {"num_frames": 0}, r"--data.num_frames: must be >= 1"),
    ("data", {"image_size": -32}, r"--data.image_size: must be >= 1"),
    ("data", {"batch_size": 0}, r"--data.batch_size: must be >= 1"),
    ("data", {"max_bad_fraction": 1.5}, r"--data.max_bad_fraction: must be between 0 and 1"),
    ("engine", {"grad_accum": 0}, r"--engine.grad_accum: must be >= 1"),
    ("optim", {"eps": 0.0}, r"--optim.eps: must be a positive number"),
])
def test_check_values_names_the_setting(section, values, message):
    from violet_ds import config

    classes = {"run": config.RunConfig, "data": config.DataConfig, "engine": config.EngineConfig,
               "optim": config.OptimConfig}
    config.check_values(**{section: classes[section]()})  # the defaults pass
    with pytest.raises(config.ConfigValueError, match=message):
        config.check_values(**{section: classes[section](**values)})


def test_model_config_types_and_sizes_are_named():
    from violet_ds.config import ConfigValueError
    from violet_ds.models.video_swin import VideoSwinConfig
    from violet_ds.models.violet import VioletConfig

    with pytest.raises(ConfigValueError, match=r"^num_layers: expected an integer, got 'two'"):
        VioletConfig(num_layers="two")
    with pytest.raises(ConfigValueError, match=r"^hidden_size: must be >= 1, got -1"):
        VioletConfig(hidden_size=-1)
    with pytest.raises(ConfigValueError, match=r"^swin_overrides.depths: item 1: expected an integer"):
        VideoSwinConfig(depths=(2, "x"))
    VioletConfig(drop_path=0, video_projection=True, text_config_dir=Path("/x"))  # ints for floats, paths for str


def _cli_in_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`violet-ds ARGS` in a fresh interpreter that reports afterwards whether torch / DeepSpeed were imported."""
    script = ("import sys\nfrom violet_ds import cli\ntry:\n    cli.main()\nexcept SystemExit as done:\n"
              "    code = done.code\nheavy = sorted(m for m in ('torch', 'deepspeed', 'numpy') if m in sys.modules)\n"
              "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=120)


def test_training_config_errors_come_before_torch(tmp_path):
    done = _cli_in_subprocess(["pretrain", "--config", "pretrain_demo", "--run.output_dir", str(tmp_path),
                               "--run.max_steps", "-5"], tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "violet-ds pretrain: error: --run.max_steps: must be >= 1, got -5"
    assert "HEAVY []" in lines
    assert not (tmp_path / "run").exists()  # nothing trained, no untrained `latest`
    done = _cli_in_subprocess(["finetune", "--config", "demo_qa_mc", "--data.max_text_len", "0"], tmp_path)
    assert done.returncode == 1 and "--data.max_text_len: must be >= 3, got 0" in done.stderr
    assert "HEAVY []" in done.stderr
    done = _cli_in_subprocess(["evaluate", "--config", "demo_qa_mc", "--split", "dev"], tmp_path)
    assert done.returncode == 2 and "--split" in done.stderr and "HEAVY []" in done.stderr


def test_live_lock_is_refused_before_torch(tmp_path):
    import socket

    from violet_ds.engine.rundir import _process_start

    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    # this test process holds the lock: alive, on this host
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "start": _process_start(os.getpid()), "command": "violet-ds pretrain",
                                                  "started": "now"}))
    done = _cli_in_subprocess(["pretrain", "--config", "pretrain_demo", "--run.output_dir", str(tmp_path / "runs"),
                               "--run.name", "busy"], tmp_path)
    assert done.returncode == 1
    live = f"is in use by a live run: violet-ds pretrain on host {socket.gethostname()}, pid {os.getpid()}"
    assert live in done.stderr
    assert "HEAVY []" in done.stderr


# ------------------------------------------------------------------------------------ run.lock
def test_unreadable_lock_is_named_and_taken_over_once_stale(tmp_path):
    from violet_ds.engine.rundir import STALE_AFTER_S, RunDirError, RunLock

    lock_file = tmp_path / "run.lock"
    lock_file.write_text("garbage\n")
    with pytest.raises(RunDirError, match=r"run.lock is not a violet-ds lock \(not JSON: 'garbage\\n'\).*rm "):
        RunLock(tmp_path).check()
    with pytest.raises(RunDirError, match="not a violet-ds lock"):
        RunLock(tmp_path).acquire()
    lock_file.write_text(json.dumps({"host": None, "pid": None}))
    with pytest.raises(RunDirError, match=r"no host and pid"):
        RunLock(tmp_path).check()
    # nothing touched it for longer than a heartbeat could: stale, taken over with a warning naming it
    old = time.time() - STALE_AFTER_S - 60
    os.utime(lock_file, (old, old))
    RunLock(tmp_path).check()
    warnings = []
    lock = RunLock(tmp_path, warn=warnings.append).acquire()
    try:
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert len(warnings) == 1 and "taking over the stale lock" in warnings[0] and "no host and pid" in warnings[0]
    finally:
        lock.release()
    assert not lock_file.exists()


# ------------------------------------------------------------------------------------ preflight
def test_preflight_checks_every_lineidx_offset(demo, tmp_path):
    from violet_ds.data.tsv import lineidx_path
    from violet_ds.engine.preflight import SAMPLED_ROWS, PreflightError, check_tsv_index

    tsv = tmp_path / "video_000.tsv"
    shutil.copy(demo / "video_000.tsv", tsv)
    shutil.copy(lineidx_path(demo / "video_000.tsv"), lineidx_path(tsv))
    count = check_tsv_index(tsv)
    import random

    sampled = {0, count - 1} | set(random.Random(0).sample(range(count), min(SAMPLED_ROWS, count)))
    row = next(r for r in range(count // 2, count) if r not in sampled and r - 1 not in sampled)
    offsets = lineidx_path(tsv).read_text().split()
    offsets[row] = str(int(offsets[row]) + 5)  # into the middle of the row before it
    lineidx_path(tsv).write_text("\n".join(offsets) + "\n")
    with pytest.raises(PreflightError, match=rf"row {row} offset {offsets[row]} does not start a row of .*"
                                             rf"build-index --tsv .* --force true"):
        check_tsv_index(tsv)


# ------------------------------------------------------------------------------------ extract-frames
def test_extract_frames_refuses_other_settings_unless_told(demo, tmp_path):
    from violet_ds.commands.data import extract_frames

    videos = tmp_path / "videos"
    videos.mkdir()
    for path in sorted((demo / "videos").glob("*.mp4"))[:2]:
        shutil.copy(path, videos / path.name)
    out = tmp_path / "shards"
    assert extract_frames(str(videos), str(out), num_frames=2, short_side=32, workers=1) == 0
    settings = json.loads((out / "frames_settings.json").read_text())["settings"]
    assert settings == [{"kind": "video", "num_frames": 2, "short_side": 32}]
    shards = sorted(out.glob("frames_*.tsv"))
    extra = sorted((demo / "videos").glob("*.mp4"))[2]
    shutil.copy(extra, videos / extra.name)
    with pytest.raises(ValueError, match=r"hold rows extracted with num_frames 2, short_side 32; this run asks for "
                                         r"num_frames 3, short_side 32.*--allow_mixed_settings true"):
        extract_frames(str(videos), str(out), num_frames=3, short_side=32, workers=1)
    assert sorted(out.glob("frames_*.tsv")) == shards  # nothing added
    assert extract_frames(str(videos), str(out), num_frames=2, short_side=64, workers=1,
                          allow_mixed_settings=True) == 0
    settings = json.loads((out / "frames_settings.json").read_text())["settings"]
    assert [s["short_side"] for s in settings] == [32, 64]
    # shards written before the settings file existed: their first row tells
    (out / "frames_settings.json").unlink()
    with pytest.raises(ValueError, match=r"num_frames 2 \(their first row, frames_000.tsv\)"):
        extract_frames(str(videos), str(out), num_frames=4, short_side=32, workers=1)


# ------------------------------------------------------------------------------------ model directories
@pytest.fixture(scope="module")
def model_dir(demo, tmp_path_factory):
    from violet_ds.config import ModelConfig, TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import build_model
    from violet_ds.pretrained import save_pretrained
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="violet-tiny", overrides={"vocab_size": 384, "max_frames": 4}))
    task = create_task("retrieval", model, TaskConfig(name="retrieval"), Tokenizer(demo / "tokenizer"))
    return save_pretrained(task, tmp_path_factory.mktemp("model") / "m",
                           clip={"num_frames": 2, "image_size": 64, "max_text_len": 16})


def _edited(model_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"]["config"].update(num_layers="two"),
     r"model.config.num_layers: expected an integer, got 'two'"),
    (lambda c: c["model"]["config"].update(hidden_size=-1), r"model.config.hidden_size: must be >= 1, got -1"),
    (lambda c: c["model"].update(name="violet-nope"), r"model 'violet-nope' cannot be built .*unknown model"),
    (lambda c: c["clip"].update(num_frames=0), r"clip.num_frames must be an integer >= 1, got 0"),
    (lambda c: c["task"].update(vtm_negatives="many"), r"task.vtm_negatives: expected an integer"),
    (lambda c: c.pop("task"), r"no `task` section"),
])
def test_model_dir_config_values_are_named(model_dir, tmp_path, edit, message):
    from violet_ds.errors import is_user_error
    from violet_ds.pretrained import from_pretrained

    with pytest.raises(Exception, match=rf"edited/config.json: {message}.*re-export") as error:
        from_pretrained(_edited(model_dir, tmp_path, edit))
    assert is_user_error(error.value)


def test_model_dir_broken_files_are_named(model_dir, tmp_path):
    from violet_ds.pretrained import ModelDirError, from_pretrained

    copy = tmp_path / "broken"
    shutil.copytree(model_dir, copy)
    (copy / "config.json").write_text('{"format": "violet_ds-model-dir",')
    with pytest.raises(ModelDirError, match=r"broken/config.json: not valid JSON \(.* at line 1, column"):
        from_pretrained(copy)
    shutil.copy(model_dir / "config.json", copy / "config.json")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"broken/model.safetensors: not a readable .safetensors file .*truncated"):
        from_pretrained(copy)


# ------------------------------------------------------------------------------------ checkpoints, run configs
def test_incomplete_tag_is_named(tmp_path):
    from violet_ds.engine.checkpoint import CheckpointError
    from violet_ds.engine.export import deepspeed_fp32_state_dict

    tag_dir = tmp_path / "checkpoints" / "step00000004"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "latest").write_text("step00000004")
    with pytest.raises(CheckpointError, match=r"step00000004 is incomplete: no violet_ds_complete.json"):
        deepspeed_fp32_state_dict(tmp_path)
    (tag_dir / "violet_ds_complete.json").write_text(json.dumps({"tag": "step00000004", "step": 4, "world_size": 2}))
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"incomplete: 1 of the 2 ZeRO optimizer partitions"):
        deepspeed_fp32_state_dict(tmp_path)


def test_yaml_tag_in_a_run_config_is_named(tmp_path):
    from violet_ds import paths

    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# header\nmodel:\n  name: !!python/object/apply:os.system [echo hi]\n"
                                         "run:\n  name: r\n")
    refused = r"config.yaml: line 3, key model.name: the YAML tag !!python/object/apply:os.system is refused"
    with pytest.raises(ValueError, match=refused):
        paths.read_run_config(run_dir)
    with pytest.raises(ValueError, match=refused):
        paths.config_argument(str(run_dir))
    own = tmp_path / "mine.yaml"
    own.write_text("data:\n  train:\n  - tsv: a.tsv\n    annotations: !!python/name:os.system\n")
    with pytest.raises(ValueError, match=r"mine.yaml: line 4, key data.train\[0\].annotations: the YAML tag "
                                         r"!!python/name:os.system is refused"):
        paths.config_argument(str(own))
    own.write_text("run: [1\n")
    with pytest.raises(ValueError, match=r"mine.yaml: not valid YAML at line 2"):
        paths.config_argument(str(own))


# ------------------------------------------------------------------------------------ predict cache
def test_unwritable_retrieval_cache_warns_and_results_are_printed(model_dir, demo, tmp_path, capsys):
    from violet_ds.commands.predict import predict

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    videos = sorted((demo / "videos").glob("*.mp4"))[:2]
    code = predict(str(model_dir), [str(v) for v in videos], query="a red circle", cache=str(blocker / "c.pt"),
                   progress=False, device="cpu")
    out, err = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["rank"] for row in rows] == [1, 2]
    assert "violet-ds predict: warning: the retrieval feature cache" in err and "cannot be written" in err
    assert not list(tmp_path.glob("**/*.tmp"))


def test_predict_refuses_non_positive_sizes_and_a_truncated_safetensors_file(tmp_path):
    from violet_ds.commands.predict import predict

    with pytest.raises(ValueError, match=r"--num_frames: must be >= 1, got 0"):
        predict(model=str(tmp_path), videos="clip.mp4", num_frames=0)
    broken = tmp_path / "weights.safetensors"
    broken.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ValueError, match=r"weights.safetensors: not a readable .safetensors file .* truncated"):
        predict(model=str(broken), videos="clip.mp4", captions=["a dog"], device="cpu")
