"""Failures end a run in one line and in seconds: a DataLoader worker's error or a stalled loader (no hang on
workers that ignore SIGTERM), Ctrl-C (the first saves and exits 130, a second exits at once), and a full or
read-only disk during a save (no partial tag, `latest` untouched, checked before step 1 too)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine_support import REPO, cli_command, cli_env, latest_tag, tiny_config, write_config

# a run that fails must be over well before this; a hang fails the test instead of blocking it
RUN_LIMIT_S = 120


def _run(config: Path, *extra: str, timeout: float = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cli_command(config, *extra), env=cli_env(), capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the run did not end within {timeout} s (a hang):\n{(expired.stderr or b'')[-3000:]!r}")


def _script(tmp_path: Path, text: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(text))
    env = dict(cli_env(), PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the script did not end within {timeout} s (a hang):\n{(expired.stderr or b'')[-3000:]!r}")


# ----------------------------------------------------------------------------------------- data loader
def _demo_with_bad_frames(demo: Path, target: Path) -> Path:
    """A copy of the demo whose video rows (all but row 0, which names the frame column) hold frames that are
    valid base64 but no image; same lengths, so the .lineidx stays valid."""
    shutil.copytree(demo, target)
    tsv = sorted(target.glob("video_*.tsv"))[0]
    lines = tsv.read_bytes().split(b"\n")
    for row in range(1, len(lines)):
        columns = lines[row].split(b"\t")
        if len(columns) > 1:
            lines[row] = b"\t".join([columns[0]] + [b"A" * len(column) for column in columns[1:]])
    tsv.write_bytes(b"\n".join(lines))
    return target


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_undecodable_frame_with_workers_ends_the_run_in_one_line(demo, tmp_path, workers):
    data = _demo_with_bad_frames(demo, tmp_path / "bad_demo")
    config = write_config(tiny_config(data, tmp_path / "runs", "bad", data__num_workers=workers, run__max_steps=20,
                                      run__save_every=0), tmp_path / "bad.yaml")
    result = _run(config)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "data loader worker" in errors[0] and "undecodable image" in errors[0], errors[0]
    assert "video_000.tsv row" in errors[0] and "samples read so far" in errors[0], errors[0]
    assert f"{workers} worker(s) stopped" in errors[0], errors[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


STALL_SCRIPT = """
    import sys, time
    import torch
    from torch.utils.data import Dataset
    from violet_ds.engine.guard import PreemptionSafeLoader, ignore_preemption_signals

    class Blocks(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, index):
            if index >= 8:
                time.sleep(600)  # a read that never returns
            return torch.tensor([index])

    workers = int(sys.argv[1])
    loader = PreemptionSafeLoader(Blocks(), batch_size=4, num_workers=workers, stall_s=1,
                                  worker_init_fn=ignore_preemption_signals if workers else None)
    for batch in loader:
        print("batch", int(batch[0]), flush=True)
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_stalled_loader_ends_with_the_watchdog_error(tmp_path, workers):
    result = _script(tmp_path, STALL_SCRIPT, str(workers))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "batch 4" in result.stdout, "the batches before the stall were delivered"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("violet_ds.engine.guard.LoaderError: data loader: no batch for 1 s"), last
    assert ("1 worker(s) stopped" if workers else "loading in the main process") in last, last
    assert "data.loader_timeout_s" in last, last


EXIT_SCRIPT = """
    import torch
    from torch.utils.data import DataLoader
    from violet_ds.engine.guard import PreemptionSafeLoader, ignore_preemption_signals

    loader = PreemptionSafeLoader(list(range(64)), batch_size=2, num_workers=2,
                                  worker_init_fn=ignore_preemption_signals)
    for batch in loader:
        # any error while the workers run (they ignore SIGTERM): the process must still end
        raise RuntimeError("failure in the step")
"""


def test_an_error_outside_the_loader_does_not_hang_on_sigterm_ignoring_workers(tmp_path):
    result = _script(tmp_path, EXIT_SCRIPT)
    assert result.returncode == 1 and "failure in the step" in result.stderr, result.stderr[-3000:]


def test_worker_error_message_is_the_datasets_last_line():
    from violet_ds.data.frames import FrameDecodeError
    from violet_ds.engine.guard import worker_error_message

    text = ("Caught FrameDecodeError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise\nviolet_ds.data.frames.FrameDecodeError: inner\n\nThe above '
            "exception was the direct cause of the following exception:\n\nTraceback (most recent call last):\n"
            '  File "y.py", line 2, in g\nviolet_ds.data.frames.FrameDecodeError: sample 1 (video \'v\', a.tsv row 1): '
            "frame 0: undecodable image\n")
    assert worker_error_message(FrameDecodeError(text)) == (
        "sample 1 (video 'v', a.tsv row 1): frame 0: undecodable image", 3)
    assert worker_error_message(ValueError("plain\nmessage")) == ("plain message", None)


# ----------------------------------------------------------------------------------------- Ctrl-C
def _interrupt(config: Path, signals: int, at_line: str, gap_s: float = 0.05) -> tuple[subprocess.Popen, str]:
    """Start a run in its own process group; at `at_line`, send SIGINT to the group (what Ctrl-C does) `signals`
    times, `gap_s` apart."""
    process = subprocess.Popen(cli_command(config), env=cli_env(), cwd=str(REPO), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + RUN_LIMIT_S
    try:
        for line in process.stdout:
            lines.append(line)
            if at_line in line:
                for number in range(signals):
                    if number:
                        time.sleep(gap_s)
                    os.killpg(process.pid, signal.SIGINT)
            if time.monotonic() > deadline:
                break
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail("the interrupted run did not end:\n" + "".join(lines)[-3000:])
    return process, "".join(lines)


def _interrupted_run(demo, tmp_path, name: str, signals: int):
    """(run dir, output) of a 40-step run with a loader worker, sent `signals` Ctrl-Cs after step 2; it must
    end with exit code 130 and no traceback."""
    config = write_config(tiny_config(demo, tmp_path / "runs", name, data__num_workers=1, run__max_steps=40,
                                      run__save_every=0), tmp_path / f"{name}.yaml")
    # the second Ctrl-C soon after the first: a tiny run saves its checkpoint within ~50 ms of the first
    process, output = _interrupt(config, signals, "step 2/40", gap_s=0.01)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return tmp_path / "runs" / name, output


def test_first_ctrl_c_finishes_the_step_saves_and_exits_130(demo, tmp_path):
    run_dir, output = _interrupted_run(demo, tmp_path, "ctrl_c", 1)
    assert "SIGINT: finishing the current step" in output, output[-3000:]
    saved = [line for line in output.splitlines() if "SIGINT received: saved step" in line]
    assert len(saved) == 1, output[-3000:]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert 2 <= step < 40 and latest_tag(run_dir) == f"step{step:08d}", output[-3000:]
    assert output.rstrip().splitlines()[-1] == saved[0], "the saved-step line is the last one"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["end"] == "stopped" and summary["steps"] == step


@pytest.mark.slow  # a real run interrupted twice (~14 s); the first Ctrl-C's test runs by default
def test_second_ctrl_c_exits_at_once_without_saving(demo, tmp_path):
    run_dir, output = _interrupted_run(demo, tmp_path, "twice", 2)
    assert "interrupted: second Ctrl-C: stopped at once, without saving" in output, output[-3000:]
    assert latest_tag(run_dir) is None and not list((run_dir / "checkpoints").glob("step*")), output[-3000:]


# ----------------------------------------------------------------------------------------- full / read-only disk
class _FailingEngine:
    """Stands for DeepSpeed's engine: writes part of a checkpoint file, then fails as `error` says."""

    def __init__(self, error: BaseException):
        self.module = torch.nn.Linear(64, 64)
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1000)
        raise self.error


def _checkpoints_with_latest(tmp_path: Path) -> Path:
    from violet_ds.engine import checkpoint as ckpt

    checkpoint_dir = tmp_path / "checkpoints"
    (checkpoint_dir / "step00000001").mkdir(parents=True)
    (checkpoint_dir / "step00000001" / ckpt.COMPLETE_MARKER).write_text(json.dumps({"tag": "step00000001",
                                                                                     "step": 1}))
    ckpt.write_latest(checkpoint_dir, "step00000001")
    return checkpoint_dir


@pytest.mark.parametrize("error, why, fix", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device", "free space"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system", "make it writable"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied", "make it writable"),
])
def test_a_failed_save_is_one_line_and_leaves_no_partial_tag(tmp_path, error, why, fix):
    from violet_ds.engine import checkpoint as ckpt
    from violet_ds.engine.distributed import World
    from violet_ds.errors import is_user_error

    checkpoint_dir = _checkpoints_with_latest(tmp_path)
    engine = _FailingEngine(error)
    with pytest.raises(ckpt.CheckpointSaveError) as raised:
        ckpt.save_checkpoint(engine, checkpoint_dir, "step00000002", {"step": 2}, World())
    message = str(raised.value)
    needed = ckpt.format_bytes(ckpt.expected_checkpoint_bytes(engine.module))
    assert "\n" not in message and is_user_error(raised.value)
    assert f"cannot write checkpoint {checkpoint_dir / 'step00000002'}: {why}" in message, message
    assert f"needs about {needed}" in message and " free there" in message and fix in message, message
    assert "`latest` still names step00000001" in message, message
    assert not (checkpoint_dir / "step00000002").exists()
    assert ckpt.read_latest(checkpoint_dir) == "step00000001"


def test_torch_short_write_is_named_as_a_full_disk(tmp_path, monkeypatch):
    from violet_ds.engine import checkpoint as ckpt
    from violet_ds.engine.distributed import World

    checkpoint_dir = _checkpoints_with_latest(tmp_path)
    # what torch's zip writer raises when the disk fills: no errno, so the free space decides
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 900)
    engine = _FailingEngine(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 16128 vs 16020"))
    with pytest.raises(ckpt.CheckpointSaveError, match="No space left on device.*900 B free there"):
        ckpt.save_checkpoint(engine, checkpoint_dir, "step00000002", {"step": 2}, World())
    assert not (checkpoint_dir / "step00000002").exists() and ckpt.read_latest(checkpoint_dir) == "step00000001"
    # any other error of the save passes through unchanged (after the partial tag is removed)
    with pytest.raises(ValueError, match="not a disk problem"):
        ckpt.save_checkpoint(_FailingEngine(ValueError("not a disk problem")), checkpoint_dir, "step00000002",
                             {"step": 2}, World())
    assert not (checkpoint_dir / "step00000002").exists()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only; skips where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow  # a real run on a tmpfs that fills up (~12 s); the save-failure unit tests run by default
def test_full_disk_during_a_real_save_is_one_line(demo, tmp_path):
    """A 4 MB file system, a 22 MB checkpoint: without the preflight the save fails; with it, step 1 never starts."""
    with _tmpfs(tmp_path / "small", "4M") as small:
        config = write_config(tiny_config(demo, small, "full", run__max_steps=2, run__save_every=1),
                              tmp_path / "full.yaml")
        result = _run(config, "--run.preflight", "false")
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "inline_container" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr[-3000:]
        assert f"cannot write checkpoint {small / 'full' / 'checkpoints' / 'step00000001'}" in errors[0]
        assert "needs about 2" in errors[0] and "MB free there" in errors[0], errors[0]
        assert not list((small / "full" / "checkpoints").glob("step*")) and latest_tag(small / "full") is None


def test_preflight_checks_the_space_for_a_checkpoint(tmp_path, monkeypatch):
    from violet_ds.engine import checkpoint as ckpt
    from violet_ds.engine.preflight import PreflightError, check_checkpoint_space

    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 5_000_000)
    with pytest.raises(PreflightError, match=r"5\.0 MB free, but a checkpoint of this run needs about 23\.0 MB"):
        check_checkpoint_space(tmp_path, 23_000_000)
    warnings = []
    check_checkpoint_space(tmp_path, 2_000_000, keep_last=3, warn=warnings.append)
    assert len(warnings) == 1 and "holds 2 more checkpoint(s)" in warnings[0] and "needs 4" in warnings[0]
    check_checkpoint_space(tmp_path, 1_000_000, keep_last=3, warn=warnings.append)
    assert len(warnings) == 1


def test_checkpoint_size_estimate_counts_weights_and_optimizer_state():
    from violet_ds.engine.checkpoint import CHECKPOINT_OVERHEAD_BYTES, expected_checkpoint_bytes

    module = torch.nn.Linear(100, 10).to(torch.bfloat16)
    module.bias.requires_grad_(False)
    # 1010 bf16 values in the state dict, 1000 trainable parameters with 12 bytes of optimizer state each
    assert expected_checkpoint_bytes(module) == 1010 * 2 + 1000 * 12 + CHECKPOINT_OVERHEAD_BYTES
