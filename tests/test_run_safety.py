"""Run safety: no code runs from a checkpoint, a diverged run stops (or rolls back), one run per
run directory, resume is exact or refused, preflight fails in seconds, user errors are one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

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


@pytest.fixture(scope="module")
def finished(demo, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) of a finished 2-step run with a checkpoint per step."""
    out = tmp_path_factory.mktemp("safety_runs")
    config = write_config(tiny_config(demo, out, "done", run__max_steps=2, run__save_every=1, run__log_every=1),
                          out / "done.yaml")
    result = _run(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, out / "done"


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


# ----------------------------------------------------------------------------------------- run directory
def test_run_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
    from violet_ds.engine.rundir import LOCK_FILE, RunDirError, RunLock, STALE_AFTER_S, _process_start

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / LOCK_FILE
        lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid,
                                         "start": _process_start(live.pid), "command": "violet-ds pretrain"}))
        with pytest.raises(RunDirError, match=f"live run.*pid {live.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    warnings: list[str] = []
    lock = RunLock(tmp_path, warn=warnings.append).acquire()  # the pid is gone now: stale
    assert warnings and "gone" in warnings[0]
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
    # another host: live while its heartbeat is fresh, stale once it is old
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirError, match="elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 10
    os.utime(lock_file, (old, old))
    RunLock(tmp_path, warn=warnings.append).acquire().release()


def test_fresh_run_into_a_run_with_checkpoints_is_refused(finished, tmp_path):
    config, source = finished
    run_dir = copy_run(source, tmp_path)
    metrics = (run_dir / "metrics.jsonl").read_text()
    result = _run(config, "--run.output_dir", str(run_dir.parent))
    assert result.returncode == 1
    assert "already holds checkpoints" in result.stderr and "--run.resume auto" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"


# ----------------------------------------------------------------------------------------- preflight
def _tsv_copy(demo: Path, tmp_path: Path) -> Path:
    from violet_ds.data.tsv import lineidx_path

    source = sorted(demo.glob("video_*.tsv"))[0]
    target = tmp_path / source.name
    shutil.copy(source, target)
    shutil.copy(lineidx_path(source), lineidx_path(target))
    return target


def test_preflight_names_a_shifted_index_truncation_and_crlf(demo, tmp_path):
    from violet_ds.data.tsv import lineidx_path
    from violet_ds.engine.preflight import PreflightError, check_tsv_index

    tsv = _tsv_copy(demo, tmp_path)
    assert check_tsv_index(tsv) > 1
    index = lineidx_path(tsv)
    offsets = index.read_text().split()
    shifted = [offsets[0]] + [str(int(o) + 7) for o in offsets[1:]]
    index.write_text("\n".join(shifted) + "\n")
    with pytest.raises(PreflightError, match="does not start a row|spans several lines.*lineidx misses a row"):
        check_tsv_index(tsv)
    # truncated together with its index: the last indexed row has lost its end
    index.write_text("\n".join(offsets) + "\n")
    data = tsv.read_bytes()
    tsv.write_bytes(data[:-100])
    with pytest.raises(PreflightError, match="truncated"):
        check_tsv_index(tsv)
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(data.replace(b"\n", b"\r\n"))
    with pytest.raises(PreflightError, match="CRLF"):
        check_tsv_index(crlf)


def test_preflight_paths_and_empty_splits(demo, tmp_path):
    from violet_ds.config import DataConfig, DataSource, ModelConfig, RunConfig
    from violet_ds.engine.preflight import PreflightError, check_split_sizes, preflight_paths

    source = DataSource(tsv=str(demo / "video_*.tsv"), annotations=str(demo / "txt_pretrain.json"), split="train")
    data = DataConfig(train=[source], tokenizer=str(demo / "tokenizer"))
    run = RunConfig(name="pf", output_dir=str(tmp_path))
    assert preflight_paths(data, run, ModelConfig(), tmp_path / "pf")
    # checkpoints/ that cannot be a directory
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("a file")
    with pytest.raises(PreflightError, match="checkpoint directory .* is not writable"):
        preflight_paths(data, run, ModelConfig(), tmp_path / "blocked")
    data.val = [DataSource(tsv=str(tmp_path / "missing_*.tsv"), annotations=str(demo / "txt_pretrain.json"),
                           split="val")]
    with pytest.raises(PreflightError, match=r"data.val\[0\].tsv"):
        preflight_paths(data, run, ModelConfig(), tmp_path / "pf")
    data.val = []
    run.init_from = str(tmp_path / "nowhere")
    with pytest.raises(PreflightError, match="run.init_from"):
        preflight_paths(data, run, ModelConfig(), tmp_path / "pf")
    with pytest.raises(PreflightError, match="split 'nosuch'"):
        check_split_sizes("val", {"val": []}, [DataSource(tsv="a.tsv", annotations="b.json", split="nosuch")])


def test_preflight_of_a_token_only_task_checks_its_token_files(demo, tmp_path):
    """VIMPAC reads `vq` (else `tsv`) token files, never frames: those are what must exist."""
    from violet_ds.config import DataConfig, DataSource, ModelConfig, RunConfig
    from violet_ds.engine.preflight import PreflightError, preflight_paths
    from violet_ds.registry import TASKS
    import violet_ds.tasks  # noqa: F401

    assert TASKS.get("vimpac_pretrain").reads_frames is False and TASKS.get("pretrain").reads_frames is True
    run = RunConfig(name="pf", output_dir=str(tmp_path))
    tokens = tmp_path / "vq.tsv"
    tokens.write_text("v0\t[]\n")
    source = DataSource(tsv="frames_not_read.tsv", vq=str(tokens), annotations=str(demo / "txt_pretrain.json"),
                        split="train")
    data = DataConfig(train=[source], tokenizer=str(demo / "tokenizer"))
    preflight_paths(data, run, ModelConfig(), tmp_path / "pf", reads_frames=False)
    with pytest.raises(PreflightError, match=r"data.train\[0\].tsv"):
        preflight_paths(data, run, ModelConfig(), tmp_path / "pf")
    source.vq = str(tmp_path / "missing_vq.tsv")
    with pytest.raises(PreflightError, match=r"data.train\[0\].vq: no file matches"):
        preflight_paths(data, run, ModelConfig(), tmp_path / "pf", reads_frames=False)


def test_empty_val_split_fails_before_training(finished, tmp_path, demo):
    config, _ = finished
    data = yaml.safe_load(config.read_text())
    annotations = json.loads((demo / "txt_pretrain.json").read_text())
    annotations["val"] = {}
    (tmp_path / "txt_empty_val.json").write_text(json.dumps(annotations))
    data["data"]["val"] = [{"tsv": str(demo / "video_*.tsv"), "annotations": str(tmp_path / "txt_empty_val.json"),
                            "split": "val"}]
    data["run"]["output_dir"] = str(tmp_path)
    started = time.time()
    result = _run(write_config(data, tmp_path / "run.yaml"))
    assert result.returncode == 1
    assert "error:" in result.stderr and "txt_empty_val.json" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "done" / "metrics.jsonl").exists() or not (tmp_path / "done" / "metrics.jsonl").read_text()
    assert time.time() - started < 120


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
    result = _run(write_config(config, tmp_path / "run.yaml"), env={"VIOLET_DS_INJECT_NONFINITE": "5,6"})
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


# ----------------------------------------------------------------------------------------- extract-frames
def test_extract_frames_cleans_temporaries_and_skips_unusable_names(demo, tmp_path):
    from violet_ds.data.extract import ExtractOptions, list_inputs, run_extraction

    videos = tmp_path / "videos"
    videos.mkdir()
    source = sorted((demo / "videos").glob("*.mp4"))
    shutil.copy(source[0], videos / "good.mp4")
    shutil.copy(source[1], videos / "bad\tname.mp4")
    shutil.copy(source[2], videos / "bad\nline.mp4")
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = [out / f"frames_000.tsv.tmp{gone.pid}", out / f"frames_000.lineidx.tmp{gone.pid}"]
    for path in stale:
        path.write_bytes(b"partial")
    report = run_extraction(list_inputs(str(videos), {".mp4"}), out, "frames", ExtractOptions(num_frames=2,
                            short_side=32), workers=1, progress=False)
    assert not any(path.exists() for path in stale)
    assert report.written == 1 and set(report.failed) == {"bad\tname", "bad\nline"}
    failures = json.loads((out / "frames_failed.json").read_text())
    assert failures["bad\tname"]["path"].endswith("bad\tname.mp4") and "tab or newline" in failures["bad\tname"]["error"]


def test_bad_samples_are_counted_over_dataloader_workers(demo, tmp_path):
    from torch.utils.data import DataLoader

    from violet_ds.data.datasets import PretrainDataset, collate
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.engine.distributed import World
    from violet_ds.engine.preflight import bad_sample_totals

    tsv = _tsv_copy(demo, tmp_path)
    lines = tsv.read_bytes().split(b"\n")
    # same length, so the .lineidx stays valid: the frames of rows 3 and 4 are no longer base64
    for row in (3, 4):
        columns = lines[row].split(b"\t")
        lines[row] = b"\t".join([columns[0]] + [b"!" * len(column) for column in columns[1:]])
    tsv.write_bytes(b"\n".join(lines))
    dataset = PretrainDataset(str(tsv), str(demo / "txt_pretrain.json"), "train", Tokenizer(str(demo / "tokenizer")),
                              num_frames=2, size=32, max_text_len=8, max_bad_fraction=0.9)
    for _ in DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate):
        pass
    totals = bad_sample_totals({"train": dataset}, World())
    # every skip counts (a bad sample skipped to the next one, which may be bad too, counts twice)
    assert totals["bad"] >= 1 and totals["seen"] == len(dataset) + totals["bad"]
    assert dataset.bad_samples == [], "the counts came from the workers, not this process"


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    from violet_ds.engine.rundir import LOCK_FILE, RunDirError, RunLock

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-that-died", "pid": 1, "slurm_job": "77",
                                                  "slurm_restart": "0"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(RunDirError, match="SLURM job 77"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path, warn=lambda message: None).acquire().release()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_nonfinite_loss_on_one_rank_rolls_back_every_rank(demo, tmp_path):
    from violet_ds.engine.distributed import free_port

    port = free_port()
    config = write_config(tiny_config(demo, tmp_path, "two", run__max_steps=8, run__save_every=2, run__log_every=2,
                                      run__on_divergence="rollback", run__max_bad_steps=2), tmp_path / "two.yaml")
    command = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--module", "violet_ds.cli", "pretrain", "--config", str(config)]
    result = subprocess.run(command, env={**cli_env(), "VIOLET_DS_INJECT_NONFINITE": "5,6@1"}, cwd=str(REPO),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    # only rank 1 saw the non-finite loss; rank 0 (which writes metrics) rolled back with it
    assert len(rollbacks) == 1 and rollbacks[0]["from_step"] == 6 and rollbacks[0]["to_step"] == 2, rollbacks
    assert [r["step"] for r in records if "loss" in r][-1] == 8
