"""Run logs: no progress bars in files, step lines at least every 5%, dated timestamps, log levels,
warnings of other ranks, the resolved config and labelled MVM panels in TensorBoard."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch

from engine_support import cli_command, cli_env, tiny_config, write_config
from violet_ds.engine.distributed import World
from violet_ds.engine.logging import RunLogger, TrainProgress, line_interval
from violet_ds.progress import format_duration, stderr_is_terminal

DATED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) INFO step (\d+)/(\d+) \(\d+%\) loss [\d.]+ lr \S+ "
                       r"[\d.]+ samples/s elapsed \S+ ETA \S+$")


def _drop_library_backlog() -> None:
    """Library records that earlier tests left for the next run log."""
    from violet_ds.engine import logging as run_logging

    run_logging._BACKLOG.take()


@pytest.fixture(autouse=True)
def _fresh_library_backlog():
    """Each test's RunLogger starts without what libraries said in earlier tests of the process."""
    _drop_library_backlog()
    yield


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
    started = datetime.datetime.now(datetime.timezone.utc)
    # every deprecation shown (Python hides them outside __main__ by default): the run must trigger none
    env = {**cli_env(), "PYTHONWARNINGS": "always::DeprecationWarning,always::PendingDeprecationWarning"}
    with open(stderr_path, "w") as stderr:
        result = subprocess.run(cli_command(write_config(config, tmp_path / "c.yaml")), env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=600)
    text = stderr_path.read_text()
    assert result.returncode == 0, text[-4000:]
    assert "\r" not in text
    assert "DeprecationWarning" not in text, text[:4000]
    # the console holds violet_ds's own lines only: dated records on stderr, the summary on stdout; what
    # DeepSpeed and torch said (op builds, info lines, torch's CUDA_HOME notice) is in log.txt as DEBUG
    assert all(DATED.match(line) for line in text.splitlines()), text[:4000]
    assert result.stdout.startswith("violet-ds pretrain finished\n"), result.stdout[:2000]
    assert all(line.startswith(("violet-ds pretrain finished", "  ")) for line in result.stdout.splitlines())
    steps = [int(match.group(2)) for match in map(STEP_LINE.match, text.splitlines()) if match]
    # one line per 5% of 40 steps (2 steps) even though metrics are logged only every 10 steps
    assert steps == list(range(2, 41, 2))
    log_txt = (tmp_path / "filelog" / "log.txt").read_text()
    assert sum(1 for line in log_txt.splitlines() if STEP_LINE.match(line)) == 20
    assert re.search(r"^\S+ \S+ DEBUG \[deepspeed\] .*DeepSpeed info: version=", log_txt, re.M)
    assert all(re.match(r"^\S+ \S+ (DEBUG|WARNING) \[deepspeed\] ", line)
               for line in log_txt.splitlines() if " [deepspeed] " in line)

    # every metrics.jsonl line says when it was written (ISO-8601 UTC), in order, within the run
    records = [json.loads(line) for line in (tmp_path / "filelog" / "metrics.jsonl").read_text().splitlines()]
    times = [datetime.datetime.fromisoformat(record["time"].replace("Z", "+00:00")) for record in records]
    assert all(record["time"].endswith("Z") for record in records)
    assert times == sorted(times) and started <= times[0] and times[-1] <= datetime.datetime.now(datetime.timezone.utc)

    events = _tensorboard(tmp_path / "filelog")
    # the resolved config as text, and the MVM panels under their own labelled tags
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 40" in config_text
    tags = set(events.Tags()["images"])
    assert {f"images/mvm_pixel/{panel}" for panel in ("input", "masked_input", "target", "reconstruction")} <= tags

    # DeepSpeed's monitor blocks (csv here, wandb the same way) get TensorBoard's scalars under its names, on
    # DeepSpeed's x axis (samples): 4 samples per step, logged every 10 steps; not DeepSpeed's own lr copy
    csv_dir = tmp_path / "csv" / "filelog"
    assert not (csv_dir / "Train_Samples_lr.csv").exists()
    assert {path.stem for path in csv_dir.glob("*.csv")} == {tag.replace("/", "_") for tag in events.Tags()["scalars"]}
    rows = (csv_dir / "train_loss_mvm.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in rows[1:]][:2] == [8, 16] and len(rows) - 1 == 20


def _wandb_records(path):
    """The records of an offline wandb run file (`run-*.wandb`): a 7-byte header, then blocks of 32 KiB
    holding chunks (crc32, little-endian length, type: 1 whole record, 2 first, 3 middle, 4 last part)
    of serialized `wandb_internal_pb2.Record` messages."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, parts, records = path.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # block padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            position += left
            continue
        parts += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


@pytest.mark.slow  # wandb's service takes a minute to start and stop on 2 cores
def test_wandb_offline_through_deepspeed_monitor(demo, tmp_path):
    """wandb is switched on by the ds_config's `wandb` block (here through engine.ds_overrides): the run gets
    the resolved configuration and TensorBoard's scalars under their names, without DeepSpeed's copies."""
    pytest.importorskip("wandb")
    config = tiny_config(demo, tmp_path, "wb", run__max_steps=4, run__save_every=0,
                         engine__ds_overrides={"wandb": {"enabled": True, "project": "violet_ds_test"}})
    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    result = subprocess.run(cli_command(write_config(config, tmp_path / "c.yaml")), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = [record for path in runs[0].glob("run-*.wandb") for record in _wandb_records(path)]
    # the resolved configuration, as config.yaml has it
    import yaml

    resolved = yaml.safe_load((tmp_path / "wb" / "config.yaml").read_text())
    config_updates = {item.key: json.loads(item.value_json) for record in records
                      if record.WhichOneof("record_type") == "config" for item in record.config.update}
    assert {key: config_updates[key] for key in resolved} == resolved
    assert config_updates["run"]["max_steps"] == 4 and config_updates["model"]["name"] == "violet-tiny"
    # the scalars: TensorBoard's names, no DeepSpeed duplicate (Train/Samples/lr)
    logged = {"/".join(item.nested_key) or item.key for record in records
              if record.WhichOneof("record_type") == "history" for item in record.history.item}
    logged = {key for key in logged if not key.startswith("_")}
    assert logged == set(_tensorboard(tmp_path / "wb").Tags()["scalars"])
    assert "train/loss_mlm" in logged and "Train/Samples/lr" not in logged
    # the run was finished (by RunLogger.close)
    assert any(record.WhichOneof("record_type") == "exit" for record in records)
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
    # every line names the rank and its host
    tag = re.escape(f"[rank 3 on {socket.gethostname()}]")
    assert re.search(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {tag} WARNING bad sample on this rank", err)
    assert re.search(rf"{tag} WARNING skipping bad clip 17", err)
    assert re.search(rf"{tag} WARNING \S+test_logging.py:\d+: UserWarning: a library complains on this rank", err)
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


def test_library_output_goes_to_log_txt_and_its_warnings_to_stderr(tmp_path, capfd):
    """What DeepSpeed / torch print (Python prints, file descriptor 1, their loggers) is DEBUG in log.txt,
    never on stdout; their real warnings reach stderr too; what they said before the log existed is kept."""
    from violet_ds.engine.logging import library_output

    capfd.readouterr()
    with library_output("deepspeed"):  # before any run log: distributed set-up
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='%s'",
                                                             "/usr/local")
    logger = RunLogger(tmp_path, World(), level="info")
    try:
        with library_output("deepspeed"):
            print("printed by Python")
            os.write(1, b"written to file descriptor 1\n")
            logging.getLogger("DeepSpeed").info("DeepSpeed info: version=0.0")
            logging.getLogger("DeepSpeed").warning("a real DeepSpeed warning")
        logger.info("our own line")
        # a failing build: its output explains the failure, so it is shown
        with pytest.raises(RuntimeError, match="build failed"):
            with library_output("torch.cpp_extension"):
                os.write(1, b"g++: error: missing.cpp: No such file\n")
                raise RuntimeError("build failed")
    finally:
        logger.close()
    out, err = capfd.readouterr()
    assert out == ""
    assert [line.split(" ", 2)[2] for line in err.splitlines()] == [
        "WARNING [deepspeed] a real DeepSpeed warning", "INFO our own line",
        "WARNING [torch.cpp_extension] g++: error: missing.cpp: No such file"]
    assert all(DATED.match(line) for line in err.splitlines())
    log_txt = [line.split(" ", 2)[2] for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert log_txt == [
        "DEBUG [deepspeed] DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "DEBUG [torch.cpp_extension] No CUDA runtime is found, using CUDA_HOME='/usr/local'",
        "DEBUG [deepspeed] DeepSpeed info: version=0.0",
        "WARNING [deepspeed] a real DeepSpeed warning",
        "DEBUG [deepspeed] written to file descriptor 1",
        "DEBUG [deepspeed] printed by Python",
        "INFO our own line",
        "WARNING [torch.cpp_extension] g++: error: missing.cpp: No such file"]
    # outside a run the library's warnings still reach stderr
    logging.getLogger("DeepSpeed").warning("after the run")
    assert "WARNING [deepspeed] after the run" in capfd.readouterr().err
    _drop_library_backlog()


def test_library_chatter_stays_out_of_a_quiet_log(tmp_path, capfd):
    """run.log_level warning: log.txt keeps the library's warnings, not its chatter."""
    from violet_ds.engine.logging import library_output

    logger = RunLogger(tmp_path, World(), level="warning")
    try:
        with library_output("zero_to_fp32"):
            print("Processing zero checkpoint 'x'")
        logging.getLogger("DeepSpeed").warning("kept")
    finally:
        logger.close()
    assert capfd.readouterr().out == ""
    assert [line.split(" ", 2)[2] for line in (tmp_path / "log.txt").read_text().splitlines()] == [
        "WARNING [deepspeed] kept"]


def test_monitors_get_tensorboard_names_and_wandb_the_resolved_config(tmp_path, monkeypatch):
    """DeepSpeed's monitor (wrapped by deepspeed_engine.initialize) drops DeepSpeed's duplicate scalars;
    RunLogger hands the monitors its own and wandb the resolved configuration."""
    from violet_ds.engine.logging import OwnScalarsMonitor

    updates, written = [], []

    class DeepSpeedMonitor:  # DeepSpeed's MonitorMaster, as the engine holds it
        enabled = True
        wandb_monitor = object()

        def write_events(self, events):
            written.extend(events)

    run = types.SimpleNamespace(config=types.SimpleNamespace(
        update=lambda values, allow_val_change=False: updates.append(values)))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run, finish=lambda: None))
    monitor = OwnScalarsMonitor(DeepSpeedMonitor())
    assert monitor.enabled and monitor.wandb_monitor is not None
    config_text = "# violet-ds pretrain\nmodel:\n  name: violet-tiny\nrun:\n  max_steps: 3\n"
    logger = RunLogger(tmp_path, World(), config_text=config_text)
    try:
        logger.attach_monitor(monitor)
        monitor.write_events([("Train/Samples/lr", 0.0, 8), ("Train/Samples/loss_scale", 1.0, 8)])  # DeepSpeed's step
        logger.scalars(1, {"lr": 1e-4, "loss": 2.5}, prefix="train/", samples=8)
        logger.scalars(1, {"accuracy": 0.5}, prefix="val/", samples=8)
    finally:
        logger.close()
    assert updates == [{"model": {"name": "violet-tiny"}, "run": {"max_steps": 3}}]
    assert written == [("train/lr", 1e-4, 8), ("train/loss", 2.5, 8), ("val/accuracy", 0.5, 8)]
    assert {name for name, _, _ in written} == set(_tensorboard(tmp_path).Tags()["scalars"])


def test_wandb_enabled_but_missing_is_one_line_naming_the_extra(monkeypatch):
    from violet_ds.engine.deepspeed_engine import require_monitor_packages
    from violet_ds.errors import UserError, is_user_error

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    require_monitor_packages({"wandb": {"enabled": False}})
    with pytest.raises(UserError) as error:
        require_monitor_packages({"wandb": {"enabled": True, "project": "p"}})
    assert is_user_error(error.value) and "\n" not in str(error.value)
    assert "pip install 'violet-ds[wandb]'" in str(error.value)


def test_metrics_jsonl_lines_carry_their_utc_time(tmp_path):
    before = datetime.datetime.now(datetime.timezone.utc)
    logger = RunLogger(tmp_path, World())
    try:
        logger.record({"step": 1, "loss": 2.0})
        logger.record({"step": 2, "loss": 1.5})
    finally:
        logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    stamps = [r["time"] for r in records]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp) for stamp in stamps)
    times = [datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")) for stamp in stamps]
    now = datetime.datetime.now(datetime.timezone.utc)
    assert before - datetime.timedelta(milliseconds=1) <= times[0] <= times[1] <= now


def test_evaluation_and_retrieval_progress_are_dated_lines_off_a_terminal(capsys):
    from violet_ds.engine.evaluator import evaluate
    from violet_ds.progress import LineProgress
    from violet_ds.tasks.retrieval import _progress

    class Counting(torch.nn.Module):
        def evaluate_full(self, loaders, world, max_batches=None):
            return None

        def evaluate_step(self, batch):
            return {"x": batch["x"]}

        def evaluate_end(self, outputs, world):
            return {"batches": float(len(outputs))}

    loaders = {"val": [{"x": torch.zeros(2)} for _ in range(4)]}
    assert evaluate(Counting(), loaders, World(), progress=True) == {"batches": 4.0}
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 4 and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d eval val: \d/4 batch", line)
                                   for line in lines)
    assert "4/4 batch (100%)" in lines[-1]
    assert evaluate(Counting(), loaders, World(), progress=False) == {"batches": 4.0}
    assert capsys.readouterr().err == ""
    # retrieval's own loops (evaluate_full): lines on the main rank, nothing on the others, nothing when the
    # evaluation is asked for no progress
    assert isinstance(_progress(range(3), "retrieval: scoring", World()), LineProgress)
    assert _progress([1, 2], "retrieval: scoring", World(rank=1, local_rank=1, world_size=2)) == [1, 2]

    class Full(Counting):
        def evaluate_full(self, loaders, world, max_batches=None):
            return {"pairs": float(sum(1 for _ in _progress(range(40), "retrieval: scoring", world, 40)))}

    assert evaluate(Full(), loaders, World(), progress=True) == {"pairs": 40.0}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20 and "retrieval: scoring: 40/40 batch (100%)" in lines[-1]
    assert evaluate(Full(), loaders, World(), progress=False) == {"pairs": 40.0}
    assert capsys.readouterr().err == ""
