"""Packaged recipes and DeepSpeed configs, and run directories that work from anywhere (violet_ds.paths)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from violet_ds import paths, resources
from violet_ds.cli import main
from violet_ds.engine.ds_config import find_ds_config
from violet_ds.errors import UserError


def test_every_recipe_and_ds_config_is_inside_the_package():
    names = resources.recipe_names()
    assert {"pretrain_demo", "pretrain_violet_v2_2d_feature", "finetune_msrvtt_qa_lavender"} <= set(names)
    assert resources.RECIPES_DIR.is_relative_to(resources.PACKAGE_DIR)
    for name in names:
        config = yaml.safe_load((resources.RECIPES_DIR / f"{name}.yaml").read_text())
        ds = (config.get("engine") or {}).get("ds_config")
        if ds is not None:  # a recipe names a packaged DeepSpeed config, never a path of the working directory
            assert Path(ds).parent == Path("."), f"{name}: engine.ds_config {ds!r}"
            assert resources.find_ds_config(ds) is not None, f"{name}: {ds} is not packaged"


def test_bare_ds_config_names_come_from_the_package_never_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero2_bf16.json").write_text("{not json")
    (tmp_path / "ds_configs").mkdir()
    assert find_ds_config("zero2_bf16.json") == resources.DS_CONFIGS_DIR / "zero2_bf16.json"
    assert find_ds_config("zero2_bf16") == resources.DS_CONFIGS_DIR / "zero2_bf16.json"
    # the repository-relative form of older configs still resolves, from any directory
    assert find_ds_config("ds_configs/cpu_test.json") == resources.DS_CONFIGS_DIR / "cpu_test.json"
    own = tmp_path / "mine" / "ds.json"
    own.parent.mkdir()
    own.write_text("{}")
    assert find_ds_config("mine/ds.json") == Path("mine/ds.json")
    with pytest.raises(FileNotFoundError, match="cpu_test, zero2_bf16"):
        find_ds_config("mine/missing.json")


def test_recipes_lists_and_shows(capsys):
    main(["recipes"])
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("pretrain_demo "))
    assert "violet-tiny" in row and "pretrain" in row and "Demo pretraining" in row
    assert "finetune_msrvtt_qa_lavender" in listing and "qa_oe (mlm)" in listing
    main(["recipes", "show", "pretrain_demo"])
    assert capsys.readouterr().out == (resources.RECIPES_DIR / "pretrain_demo.yaml").read_text()
    with pytest.raises(UserError, match="did you mean: pretrain_demo"):
        main(["recipes", "show", "pretrain_dmo"])


def test_config_name_loads_the_packaged_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", "pretrain_demo", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == "violet-tiny" and printed["engine"]["ds_config"] == "cpu_test.json"
    # data paths stay relative to where the user runs it
    assert printed["data"]["tokenizer"] == "data/demo/tokenizer"
    with pytest.raises(UserError, match="no such file, run directory or packaged recipe; did you mean"):
        main(["pretrain", "--config=pretrain_dem", "--print_config"])


def _run_config(root: Path) -> dict:
    return {
        "model": {"name": "violet-tiny", "weights": None, "pretrained_swin": "/models/swin.pth"},
        "data": {"tokenizer": str(root / "data/tok"),
                 "train": [{"tsv": f"{root}/data/video_*.tsv,{root}/data/extra.tsv", "annotations": f"{root}/data/a.json"}]},
        "engine": {"ds_config": "cpu_test.json"},
        "run": {"output_dir": str(root / "runs"), "name": "demo", "init_from": None},
    }


def test_make_absolute_keeps_packaged_names_and_globs(tmp_path):
    config = {"data": {"tokenizer": "data/tok", "train": [{"tsv": "d/v_*.tsv, d/x.tsv", "annotations": "~/a.json"}]},
              "engine": {"ds_config": "zero2_bf16.json"}, "run": {"output_dir": "runs", "init_from": "/abs/w"}}
    paths.make_absolute(config, tmp_path)
    assert config["data"]["tokenizer"] == str(tmp_path / "data/tok")
    assert config["data"]["train"][0]["tsv"] == f"{tmp_path}/d/v_*.tsv,{tmp_path}/d/x.tsv"
    assert config["data"]["train"][0]["annotations"] == os.path.expanduser("~/a.json")
    assert config["engine"]["ds_config"] == "zero2_bf16.json"
    assert config["run"] == {"output_dir": str(tmp_path / "runs"), "init_from": "/abs/w"}


def test_relocate_follows_a_moved_run_and_its_data(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for name in ("data/tok/vocab.txt", "data/video_0.tsv", "data/extra.tsv", "data/a.json"):
        (new / name).parent.mkdir(parents=True, exist_ok=True)
        (new / name).write_text("x")
    (new / "runs/demo").mkdir(parents=True)
    config = paths.relocate(_run_config(old), new / "runs/demo")
    assert config["data"]["tokenizer"] == str(new / "data/tok")
    assert config["data"]["train"][0]["tsv"] == f"{new}/data/video_*.tsv,{new}/data/extra.tsv"
    assert config["data"]["train"][0]["annotations"] == str(new / "data/a.json")
    assert config["model"]["pretrained_swin"] == "/models/swin.pth"  # not found either way: left as recorded
    assert config["run"]["output_dir"] == str(new / "runs") and config["run"]["name"] == "demo"


def test_relative_paths_of_older_runs_are_read_from_where_they_started(tmp_path):
    (tmp_path / "data/tok").mkdir(parents=True)
    (tmp_path / "runs/demo/checkpoints").mkdir(parents=True)
    old_style = {"data": {"tokenizer": "data/tok", "train": []}, "run": {"output_dir": "runs", "name": "demo"}}
    (tmp_path / "runs/demo/config.yaml").write_text(yaml.safe_dump(old_style))
    config = paths.read_run_config(tmp_path / "runs/demo")
    assert config["data"]["tokenizer"] == str(tmp_path / "data/tok")


def test_config_argument_of_a_run_directory(tmp_path):
    run_dir = tmp_path / "runs/demo"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# header\n" + yaml.safe_dump(_run_config(tmp_path / "gone")))
    for value in (str(run_dir), str(run_dir / "config.yaml")):
        loaded = yaml.safe_load(paths.config_argument(value))
        assert loaded["run"] == {"output_dir": str(tmp_path / "runs"), "name": "demo", "init_from": None}
    plain = tmp_path / "mine.yaml"
    plain.write_text("run: {name: x}\n")
    assert paths.config_argument(str(plain)) == str(plain)
    with pytest.raises(UserError, match="not a run directory"):
        paths.config_argument(str(tmp_path))


def test_check_resume_sees_a_moved_run_as_unchanged(tmp_path):
    from violet_ds.engine.checkpoint import config_differences, RESUME_KEYS

    old, new = tmp_path / "old", tmp_path / "new"
    (new / "data").mkdir(parents=True)
    for name in ("video_0.tsv", "extra.tsv", "a.json"):
        (new / "data" / name).write_text("x")
    saved = paths.relocate(_run_config(old), new / "runs/demo")
    current = _run_config(new)
    assert config_differences(saved, current, RESUME_KEYS) == []
    assert json.dumps(saved["data"]["train"]) == json.dumps(current["data"]["train"])


def test_official_checkpoint_without_the_vocabulary_names_the_extra(tmp_path, monkeypatch):
    """A plain install (no [official] extra) opening an official checkpoint: one line saying what to do."""
    from types import SimpleNamespace

    import violet_ds.data.tokenizer as tokenizer_module
    import violet_ds.models.checkpoint_io as checkpoint_io
    import violet_ds.predict as predict_module
    from violet_ds.predict import Predictor

    for module in (tokenizer_module, predict_module):
        monkeypatch.setattr(module, "find_packaged_bert", lambda: None)
    monkeypatch.setattr(predict_module, "read_weights", lambda path: checkpoint_io.OfficialWeights({}, "official", path))
    monkeypatch.setattr(predict_module, "official_model", lambda weights: SimpleNamespace(heads={}))
    path = tmp_path / "violet_pretrain.pt"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pip install 'violet-ds\[official\]'.*--tokenizer DIR") as error:
        Predictor.load(path)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"violet-ds\[official\]"):
        tokenizer_module.load_tokenizer(None)


def test_runtime_dependencies_are_what_the_library_imports():
    """pyproject's runtime list == the third-party packages violet_ds imports (optional ones are extras)."""
    import ast
    import sys
    import tomllib

    package = Path(resources.PACKAGE_DIR)
    imported = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"violet_ds"}
    # import name -> distribution; tensorboard is imported through torch.utils.tensorboard
    distribution = {"PIL": "pillow", "yaml": "pyyaml"}
    optional = {"apex", "wandb"}  # NVIDIA apex: built from source; wandb: the [wandb] extra
    needed = {distribution.get(name, name) for name in imported - optional} | {"tensorboard"}
    project = tomllib.loads((package.parent / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ]", spec)[0].lower() for spec in project["dependencies"]}
    assert declared == needed
    assert set(project["optional-dependencies"]) >= {"official", "wandb", "test"}


def test_a_deprecated_model_key_is_read_under_its_name(tmp_path):
    """An older run's config.yaml spells `model.offload_activations` as `offload_video_activations`."""
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"model": {"name": "violet-tiny", "offload_video_activations": True}}))
    with pytest.warns(FutureWarning, match=r"model\.offload_video_activations is deprecated"):
        text = paths.config_argument(str(old))
    assert yaml.safe_load(text)["model"] == {"name": "violet-tiny", "offload_activations": True}
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"model": {"offload_video_activations": True, "offload_activations": False}}))
    with pytest.raises(ValueError, match=r"keep model\.offload_activations only"):
        paths.config_argument(str(both))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"model": {"offload_activations": True}}))
    assert paths.config_argument(str(plain)) == str(plain)
