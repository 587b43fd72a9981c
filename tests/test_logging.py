"""Run logs: no progress bars in files, step lines at least every 5%, dated timestamps, log levels,
warnings of other ranks, the resolved config and labelled MVM panels in TensorBoard."""

from __future__ import annotations

import logging
import re
import subprocess

import pytest
import torch

from engine_support import cli_command, cli_env, tiny_config, write_config
from violet_ds.engine.distributed import World
from violet_ds.engine.logging import RunLogger, TrainProgress, line_interval
from violet_ds.progress import format_duration, stderr_is_terminal

STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) INFO step (\d+)/(\d+) \(\d+%\) loss [\d.]+ lr \S+ "
                       r"[\d.]+ samples/s elapsed \S+ ETA \S+$")


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def test_pretraining_with_stderr_in_a_file_writes_step_lines_and_no_bar(demo, tmp_path):
    """The issue's done-check: stderr to a file, `run.progress` left on, 40 steps logged every 10."""
    config = tiny_config(demo, tmp_path, "filelog", run__max_steps=40, run__log_every=10, run__progress=True,
                         run__save_every=0, run__image_every=20,
                         engine__ds_overrides={"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"),
                                                               "job_name": "filelog"}})
    stderr_path = tmp_path / "stderr.txt"
    # every deprecation shown (Python hides them outside __main__ by default): the run must trigger none
    env = {**cli_env(), "PYTHONWARNINGS": "always::DeprecationWarning,always::PendingDeprecationWarning"}
    with open(stderr_path, "w") as stderr:
        result = subprocess.run(cli_command(write_config(config, tmp_path / "c.yaml")), env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=600)
    text = stderr_path.read_text()
    assert result.returncode == 0, text[-4000:]
    assert "\r" not in text
    assert "DeprecationWarning" not in text, text[:4000]
    steps = [int(match.group(2)) for match in map(STEP_LINE.match, text.splitlines()) if match]
    # one line per 5% of 40 steps (2 steps) even though metrics are logged only every 10 steps
    assert steps == list(range(2, 41, 2))
    log_txt = (tmp_path / "filelog" / "log.txt").read_text()
    assert sum(1 for line in log_txt.splitlines() if STEP_LINE.match(line)) == 20

    events = _tensorboard(tmp_path / "filelog")
    # the resolved config as text, and the MVM panels under their own labelled tags
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 40" in config_text
    tags = set(events.Tags()["images"])
    assert {f"images/mvm_pixel/{panel}" for panel in ("input", "masked_input", "target", "reconstruction")} <= tags

    # DeepSpeed's monitor blocks (csv here, wandb the same way) get our loss terms next to DeepSpeed's lr,
    # on DeepSpeed's x axis (samples): 4 samples per step, logged every 10 steps
    csv_dir = tmp_path / "csv" / "filelog"
    assert (csv_dir / "Train_Samples_lr.csv").is_file()
    rows = (csv_dir / "train_loss_mvm.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in rows[1:]][:2] == [8, 16] and len(rows) - 1 == 20


@pytest.mark.slow  # wandb's service takes a minute to start and stop on 2 cores
def test_wandb_offline_through_deepspeed_monitor(demo, tmp_path):
    """wandb is switched on by the ds_config's `wandb` block (here through engine.ds_overrides)."""
    pytest.importorskip("wandb")
    config = tiny_config(demo, tmp_path, "wb", run__max_steps=4, run__save_every=0,
                         engine__ds_overrides={"wandb": {"enabled": True, "project": "violet_ds_test"}})
    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    result = subprocess.run(cli_command(write_config(config, tmp_path / "c.yaml")), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # our loss terms next to DeepSpeed's lr in the run's record, and the run was finished (by RunLogger.close)
    record = b"".join(path.read_bytes() for path in runs[0].glob("run-*.wandb"))
    assert b"train/loss_mlm" in record and b"Train/Samples/lr" in record
    assert "finishing run" in (runs[0] / "logs" / "debug.log").read_text()


def test_terminal_gets_a_bar_and_log_txt_the_step_lines(demo, tmp_path):
    """stderr on a pseudo-terminal: a tqdm bar, other log lines printed above it, no step lines there."""
    import os
    import pty

    config = tiny_config(demo, tmp_path, "tty", run__max_steps=6, run__log_every=1, run__progress=True,
                         run__save_every=0)
    master, slave = pty.openpty()
    # a terminal of 120 columns (a fresh pty has 0, in which tqdm draws nothing)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cli_command(write_config(config, tmp_path / "c.yaml")), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0
    console = b"".join(chunks).decode(errors="replace")
    assert "train: 100%" in console and "6/6 [" in console
    assert "INFO saved checkpoint" in console
    assert " INFO step " not in console
    log_txt = (tmp_path / "tty" / "log.txt").read_text()
    assert [int(m.group(2)) for m in map(STEP_LINE.match, log_txt.splitlines()) if m] == [1, 2, 3, 4, 5, 6]


def test_line_interval_is_at_most_five_percent_and_prefers_log_windows():
    assert line_interval(1050, 10) == 50    # on log windows, 21 lines
    assert line_interval(40, 10) == 2       # log windows too sparse: every 2 steps
    assert line_interval(10, 1) == 1
    for total in (1, 7, 19, 20, 99, 1000, 12345):
        for log_every in (1, 3, 10, 100):
            interval = line_interval(total, log_every)
            assert 1 <= interval <= max(1, total // 20)


def test_format_duration():
    assert format_duration(3723.4) == "1:02:03"
    assert format_duration(2 * 86400 + 5) == "2d 0:00:05"
    assert format_duration(float("nan")) == "?"


def test_bar_on_terminal_only_and_log_txt_keeps_step_lines(tmp_path, capsys):
    logger = RunLogger(tmp_path, World(), level="info")
    try:
        progress = TrainProgress(20, 0, World(), logger, enabled=True, log_every=1, terminal=True)
        assert progress.bar is not None
        progress.update()
        progress.report(1, 2.5, 1e-4, 10.0)
        progress.close()
        err = capsys.readouterr().err
        assert "step 1/20" not in err        # the bar shows it on the console ...
        progress = TrainProgress(20, 0, World(), logger, enabled=True, log_every=1, terminal=False)
        assert progress.bar is None
        progress.report(2, 2.5, 1e-4, 10.0)
        progress.close()
        err = capsys.readouterr().err
        assert "\r" not in err and "step 2/20 (10%) loss 2.5000" in err
    finally:
        logger.close()
    log_txt = (tmp_path / "log.txt").read_text()
    assert "step 1/20" in log_txt and "step 2/20" in log_txt  # ... and log.txt has both lines


def test_log_level_and_dated_timestamps(tmp_path):
    before = logging.getLogger("DeepSpeed").level
    logger = RunLogger(tmp_path, World(), level="warning")
    try:
        assert logging.getLogger("DeepSpeed").level == logging.WARNING
        logger.info("quiet info")
        logger.warning("loud warning")
        logging.getLogger("violet_ds.data.datasets").warning("module warning")
    finally:
        logger.close()
    assert logging.getLogger("DeepSpeed").level == before   # restored
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert not any("quiet info" in line for line in lines)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING loud warning$", lines[0])
    assert lines[1].endswith("WARNING module warning")
    with pytest.raises(ValueError, match="log level"):
        RunLogger(tmp_path, World(), level="verbose")


def test_warnings_of_other_ranks_reach_their_stderr_with_the_rank(tmp_path, capsys):
    rank3 = World(rank=3, local_rank=3, world_size=4)
    logger = RunLogger(tmp_path / "rank3", rank3)
    try:
        logger.info("rank 0 talks, others do not")
        logger.warning("same on every rank: rank 0 only")
        logger.warning("bad sample on this rank", all_ranks=True)
        logging.getLogger("violet_ds.data.datasets").warning("skipping bad clip 17")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library complains on this rank", UserWarning)
    finally:
        logger.close()
    err = capsys.readouterr().err
    assert "rank 0 talks" not in err and "rank 0 only" not in err
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 3\] WARNING bad sample on this rank", err)
    assert "[rank 3] WARNING skipping bad clip 17" in err
    assert re.search(r"\[rank 3\] WARNING \S+test_logging.py:\d+: UserWarning: a library complains on this rank", err)
    assert not (tmp_path / "rank3").exists()   # other ranks write no files
    import warnings

    assert warnings.showwarning.__module__ != "logging"   # capture ends with the logger


def test_config_text_in_tensorboard(tmp_path):
    logger = RunLogger(tmp_path, World(), config_text="model:\n  name: violet-tiny\n")
    logger.close()
    text = _tensorboard(tmp_path).Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "    model:\n      name: violet-tiny"


def test_stderr_is_terminal_is_false_under_pytest_capture():
    assert stderr_is_terminal() is False


def test_images_reject_wrong_shape(tmp_path):
    logger = RunLogger(tmp_path, World())
    try:
        with pytest.raises(ValueError, match="must be"):
            logger.images(0, {"x": torch.zeros(2, 3, 4, 4)})
    finally:
        logger.close()


def test_line_progress_for_data_commands():
    import io

    from violet_ds.progress import LineProgress, progress

    stream = io.StringIO()
    items = list(LineProgress(range(100), desc="extracting", unit="file", stream=stream))
    assert items == list(range(100))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 20
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d extracting: 5/100 file \(5%\) [\d.]+ file/s elapsed \S+ ETA \S+$",
                    lines[0])
    assert "100/100 file (100%)" in lines[-1]
    # with-statement use (update / close), resumed from `initial`, a total that is not a multiple of 20
    stream = io.StringIO()
    with LineProgress(total=30, initial=10, desc="extract hog", unit="clip", stream=stream) as bar:
        for _ in range(20):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and lines[-1].split(": ", 1)[1].startswith("30/30 clip")
    # not a terminal (pytest captures stderr): lines, not a bar
    assert isinstance(progress(range(3), desc="x"), LineProgress)
