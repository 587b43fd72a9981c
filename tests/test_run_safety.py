"""Run safety: one run per run directory, preflight fails in seconds, user errors are one line, bad samples
and unusable video names are counted or skipped (checkpoint safety: test_engine_checkpoint.py; the divergence
guard: test_engine_divergence.py)."""

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
import yaml

from engine_support import REPO, cli_command, cli_env, copy_run, write_config


def _run(config: Path, *extra: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(config, *extra), env={**cli_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


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
