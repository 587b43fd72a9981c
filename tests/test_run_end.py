"""How a run ends and what it leaves: never `latest` on weights that give NaN, summary.json for every ending
(and kept by a resume that had nothing to do), `run.init_from` of every documented kind, and `export` /
`predict` refusing non-finite weights or outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine_support import (REPO, cli_command, cli_env, copy_run, latest_tag, nonfinite_command, tiny_config,
                            write_config)


def _run(config: Path, *extra: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(config, *extra), env={**cli_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


def _console(monkeypatch, argv: list[str]) -> int:
    """`violet-ds ARGV` as from the console (user errors as one line): its exit code."""
    from violet_ds.cli import main

    monkeypatch.setattr(sys, "argv", ["violet-ds", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON; strict parsers reject them)."""
    def refuse(token):
        raise ValueError(f"non-JSON number {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(demo, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) of a finished 2-step run with a checkpoint per step."""
    out = tmp_path_factory.mktemp("end_runs")
    config = write_config(tiny_config(demo, out, "done", run__max_steps=2, run__save_every=1,
                                      run__log_sample_indices=False), out / "done.yaml")
    result = _run(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, out / "done"


# ----------------------------------------------------------------------------------------- summary.json
def test_finished_run_summary_and_a_resume_with_nothing_to_do_keeps_it(finished, tmp_path):
    config, source = finished
    summary = _strict_json((source / "summary.json").read_text())
    assert summary["end"] == "finished" and summary["error"] is None
    assert summary["steps"] == 2 and summary["start_step"] == 0 and summary["last_loss"] is not None
    assert summary["checkpoint"] == str(source / "checkpoints" / "step00000002")
    run_dir = copy_run(source, tmp_path)
    before = (run_dir / "summary.json").read_bytes()
    result = _run(config, "--run.output_dir", str(run_dir.parent), "--run.resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing to train: the run is already at step 2/2" in result.stdout, result.stdout[-2000:]
    assert (run_dir / "summary.json").read_bytes() == before
    assert latest_tag(run_dir) == "step00000002"


def test_end_of_run_names_each_ending():
    from violet_ds.commands.run import _finite_json, end_of_run
    from violet_ds.engine.divergence import DivergenceError
    from violet_ds.engine.trainer import TrainSummary

    assert end_of_run(TrainSummary()) == "finished"
    assert end_of_run(TrainSummary(preempted=True, stop_signal="SIGTERM")) == "preempted"
    assert end_of_run(TrainSummary(preempted=True, stop_signal="SIGINT")) == "stopped"
    assert end_of_run(TrainSummary(preempted=True, stop_signal="SIGINT"), SystemExit(130)) == "stopped"
    assert end_of_run(TrainSummary(), KeyboardInterrupt()) == "stopped"
    assert end_of_run(TrainSummary(), DivergenceError("the run diverged")) == "diverged"
    assert end_of_run(TrainSummary(), OSError("No space left on device")) == "failed"
    assert _finite_json({"a": [1.0, float("nan")], "b": float("inf"), "c": "x"}) == {"a": [1.0, None], "b": None,
                                                                                    "c": "x"}


# ----------------------------------------------------------------------------------------- non-finite weights
def test_nonfinite_last_steps_never_become_latest(demo, tmp_path):
    """The last step's loss is non-finite (1 < run.max_bad_steps): the run ends diverged (exit 1, one line),
    the checkpoint whose weights gave it is marked and `latest` goes back; summary.json says why."""
    config = tiny_config(demo, tmp_path, "nan_end", run__max_steps=3, run__save_every=1, run__max_bad_steps=3,
                         run__log_sample_indices=False)
    result = subprocess.run(nonfinite_command(write_config(config, tmp_path / "run.yaml"), "3"), env=cli_env(),
                            capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "finished" not in result.stdout
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "the loss was non-finite on the last 1 step(s) of the run, from step 3" in error[0]
    run_dir = tmp_path / "nan_end"
    assert latest_tag(run_dir) == "step00000001"
    assert (run_dir / "checkpoints" / "step00000002" / "violet_ds_diverged.json").is_file()
    assert not (run_dir / "checkpoints" / "step00000003").exists()
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert summary["end"] == "diverged" and "from step 3" in summary["error"]
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / "step00000001")
    assert summary["divergence"]["bad_steps"] == 1 and summary["steps"] == 3


class _Log:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, message: str) -> None:
        self.lines.append(message)

    info = warning

    def record(self, record: dict) -> None:
        self.lines.append(json.dumps(record))

    def flush(self) -> None:
        pass


def _guarded(tmp_path: Path, max_bad_steps: int, weight: float):
    from violet_ds.config import RunConfig
    from violet_ds.data.sampler import SampleCursor
    from violet_ds.engine.distributed import World
    from violet_ds.engine.divergence import GuardedRun

    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = weight
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    return GuardedRun(
        run=RunConfig(max_bad_steps=max_bad_steps, on_divergence="stop", max_rollbacks=0, resume=None),
        world=World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), logger=_Log(),
        position=SimpleNamespace(step=5, cursor=SampleCursor()), module=module,
        checkpoint_dir=tmp_path / "checkpoints", restore=lambda tag: 0, run_dir=tmp_path,
        resolved_config="optim: {lr: 0.001}")


@pytest.mark.parametrize("max_bad_steps", [3, 0], ids=["guard_on", "guard_off"])
def test_nonfinite_weights_are_never_saved_and_end_the_run(tmp_path, max_bad_steps):
    from violet_ds.engine.divergence import DivergenceError, DivergenceWatch

    watch = DivergenceWatch(_guarded(tmp_path, max_bad_steps, float("nan")))
    assert watch.allow_save() is False
    assert "some weights are not finite" in watch.logger.lines[-1]
    with pytest.raises(DivergenceError, match=r"the weights are not finite after the last step \(5\)"):
        watch.check_end()
    finite = DivergenceWatch(_guarded(tmp_path, max_bad_steps, 1.0))
    assert finite.allow_save() is True and finite.check_end() is False


def _poison_fp32_master(tag_dir: Path) -> None:
    """Put a NaN into the fp32 master weights (what zero_to_fp32 exports) of a ZeRO-2 checkpoint."""
    from violet_ds.engine.checkpoint import safe_load

    path = next(tag_dir.glob("*optim_states.pt"))
    state = safe_load(path)
    with torch.no_grad():
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][0] = float("nan")
    torch.save(state, path)


def test_export_predict_and_init_from_refuse_nonfinite_weights(finished, tmp_path, demo, capsys, monkeypatch):
    from violet_ds.commands.run import load_init_weights
    from violet_ds.weights import NonFiniteWeightsError

    run_dir = copy_run(finished[1], tmp_path)
    tag_dir = run_dir / "checkpoints" / "step00000002"
    _poison_fp32_master(tag_dir)
    video = sorted((demo / "videos").glob("*.mp4"))[0]
    commands = [["export", "--checkpoint", str(run_dir), "--output", str(tmp_path / "w.safetensors")],
                ["export", "--checkpoint", str(run_dir), "--format", "dir", "--output", str(tmp_path / "m")],
                ["predict", "--progress", "false", "--model", str(run_dir), "--videos", str(video),
                 "--captions", "[a red circle]"]]
    for argv in commands:
        capsys.readouterr()
        code = _console(monkeypatch, argv)
        out, err = capsys.readouterr()
        assert code == 1, argv
        error = [line for line in err.splitlines() if "error:" in line]
        assert len(error) == 1 and f"checkpoint {tag_dir}: tensor model." in error[0], err[-2000:]
        assert "holds non-finite values" in error[0] and "step00000001" in error[0]
        assert out.strip() == "" or "nan" not in out.lower()
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "m").exists()
    with pytest.raises(NonFiniteWeightsError):
        load_init_weights(torch.nn.Linear(1, 1), str(run_dir))


def _tiny_task(demo: Path):
    from violet_ds.config import ModelConfig, TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="violet-tiny", overrides={"vocab_size": 384, "max_frames": 4}))
    return create_task("pretrain", model, TaskConfig(name="pretrain", loss_weights={"vtm": 1.0, "mlm": 1.0,
                                                                                     "mvm": 0.0}),
                       Tokenizer(demo / "tokenizer"))


def test_predict_refuses_nonfinite_weights_and_never_prints_nan(demo, tmp_path, capsys, monkeypatch):
    from violet_ds.pretrained import save_pretrained

    clip = {"num_frames": 2, "image_size": 64, "max_text_len": 16}
    video = sorted((demo / "videos").glob("*.mp4"))[0]
    task = _tiny_task(demo)
    with torch.no_grad():
        task.heads["score"][3].weight.fill_(float("nan"))
    nan_dir = save_pretrained(task, tmp_path / "nan", clip=clip)
    capsys.readouterr()
    code = _console(monkeypatch, ["predict", "--progress", "false", "--model", str(nan_dir), "--videos", str(video),
                                  "--question", "who", "--options", "[a man, a woman]"])
    out, err = capsys.readouterr()
    error = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and out == ""
    assert len(error) == 1 and f"{nan_dir / 'model.safetensors'}: tensor heads.score.3.weight" in error[0]
    # finite weights whose outputs overflow: an error line per video, never a NaN score
    with torch.no_grad():
        task.heads["score"][3].weight.fill_(3e38)
        task.heads["score"][1].weight.fill_(3e38)
    huge_dir = save_pretrained(task, tmp_path / "huge", clip=clip)
    capsys.readouterr()
    code = _console(monkeypatch, ["predict", "--progress", "false", "--model", str(huge_dir), "--videos", str(video),
                                  "--question", "who", "--options", "[a man, a woman]"])
    out, err = capsys.readouterr()
    rows = [_strict_json(line) for line in out.splitlines()]
    assert code == 1 and len(rows) == 1 and "not finite" in rows[0]["error"], out
    assert "answer" not in rows[0] and "scores" not in rows[0]
    assert f"skipped {video}: the model's scores are not finite" in err


# ----------------------------------------------------------------------------------------- run.init_from
@pytest.fixture(scope="module")
def init_sources(finished, tmp_path_factory):
    """{kind: (path, reference weights)} for every kind of `run.init_from` the README lists."""
    from violet_ds.cli import main
    from violet_ds.engine.export import deepspeed_fp32_state_dict
    from violet_ds.models.checkpoint_io import to_official_state_dict

    run_dir = finished[1]
    out = tmp_path_factory.mktemp("init_sources")
    latest = deepspeed_fp32_state_dict(run_dir)
    first = deepspeed_fp32_state_dict(run_dir / "checkpoints" / "step00000001")
    main(["export", "--checkpoint", str(run_dir), "--format", "dir", "--output", str(out / "model")])
    main(["export", "--checkpoint", str(run_dir), "--output", str(out / "weights.safetensors")])
    torch.save(to_official_state_dict(latest), out / "official.pt")
    return {"run_dir": (run_dir, latest), "checkpoints_dir": (run_dir / "checkpoints", latest),
            "tag_dir": (run_dir / "checkpoints" / "step00000001", first), "model_dir": (out / "model", latest),
            "safetensors": (out / "weights.safetensors", latest), "official": (out / "official.pt", latest)}


@pytest.mark.parametrize("kind", ["run_dir", "checkpoints_dir", "tag_dir", "model_dir", "safetensors", "official"])
def test_init_from_accepts_every_documented_kind(init_sources, finished, kind):
    """What `violet-ds pretrain|finetune --run.init_from PATH` does with PATH: the preflight check, then the load."""
    from violet_ds.commands.run import load_init_weights
    from violet_ds.engine import preflight
    from violet_ds.pretrained import load_run

    path, reference = init_sources[kind]
    preflight._check_init_from(str(path))
    task = load_run(finished[1], mvm=True)[0]  # the run's task, then overwritten with random values
    with torch.no_grad():
        for param in task.parameters():
            param.normal_()
    report = load_init_weights(task, str(path))
    assert report.initialised == [] and report.unexpected == [] and report.mismatched == {}
    state = task.state_dict()
    assert all(torch.equal(state[key], value) for key, value in reference.items()), kind


def test_init_from_elsewhere_names_every_kind(tmp_path):
    from violet_ds.engine import preflight

    (tmp_path / "empty").mkdir()
    with pytest.raises(preflight.PreflightError) as info:
        preflight._check_init_from(str(tmp_path / "empty"))
    message = str(info.value)
    for kind in ("run directory", "checkpoints/", "tag directory", "model directory", ".safetensors", "official"):
        assert kind in message


@pytest.mark.slow  # a real finetuning run (~10 s); every kind of init_from is loaded by the default suite
def test_init_from_a_model_directory_through_the_cli(init_sources, demo, tmp_path):
    model_dir = init_sources["model_dir"][0]
    config = tiny_config(demo, tmp_path, "from_model_dir", run__max_steps=1, run__save_every=0,
                         run__log_sample_indices=False)
    result = _run(write_config(config, tmp_path / "run.yaml"), "--run.init_from", str(model_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "from_model_dir" / "log.txt").read_text()
    assert f"init_from {model_dir}:" in log and "newly initialised: []" in log, log[-3000:]
