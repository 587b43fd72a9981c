"""The training commands' CLI: stacked configs, dotted overrides, --print_config, validation errors."""

from __future__ import annotations

import pytest
import yaml

from violet_ds.cli import main


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_print_config_stacks_files_and_overrides(tmp_path, capsys):
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"model": {"name": "violet-v2"}, "optim": {"lr": 1e-4}, "run": {"name": "x"}}))
    second.write_text(yaml.safe_dump({"optim": {"lr": 2e-5}, "task": {"mvm_targets": {"hog": 1.0}}}))
    code, out, _ = _run(capsys, "--local_rank=0", "pretrain", "--config", str(first), "--config", str(second),
                        "--engine.grad_accum", "4", "--print_config")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["model"]["name"] == "violet-v2"
    assert resolved["optim"]["lr"] == 2e-5            # the later file wins
    assert resolved["engine"]["grad_accum"] == 4      # dotted override
    assert resolved["task"]["mvm_targets"] == {"hog": 1.0}
    assert set(resolved) >= {"model", "data", "task", "optim", "engine", "run"}


def test_shipped_recipes_parse(capsys):
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].glob("launch/configs/pretrain_*.yaml"))
    assert len(recipes) >= 6
    for recipe in recipes:
        code, out, err = _run(capsys, "pretrain", "--config", str(recipe), "--print_config")
        assert code == 0, f"{recipe}: {err}"
        assert yaml.safe_load(out)["task"]["name"] == "pretrain"


@pytest.mark.parametrize("argv,needle", [
    (["--optim.lrr", "1e-4"], "lrr"),
    (["--engine.grad_accum", "two"], "grad_accum"),
    (["--task.mlm_replace", "random"], "mlm_replace"),
    (["--optim.schedule", "step"], "schedule"),
])
def test_unknown_keys_and_wrong_types_are_named(capsys, argv, needle):
    code, _, err = _run(capsys, "pretrain", *argv, "--print_config")
    assert code != 0
    assert needle in err


def test_unknown_key_in_yaml_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": {"batch_size": 4, "num_wokers": 2}}))
    code, _, err = _run(capsys, "pretrain", "--config", str(config))
    assert code != 0 and "num_wokers" in err


def test_help_lists_sections(capsys):
    code, out, _ = _run(capsys, "pretrain", "--help")
    assert code == 0
    for section in ("--model.name", "--data.batch_size", "--optim.lr", "--engine.ds_config", "--run.resume"):
        assert section in out
