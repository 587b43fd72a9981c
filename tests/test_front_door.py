"""What a newcomer meets first: declared dependencies, `--version`, `--help` that explains every option."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from violet_ds.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_pyproject_declares_every_runtime_requirement():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    listed = _requirement_names(lines)
    # requirements.txt pins the tested environment exactly; docstring-parser is what jsonargparse[signatures] brings
    assert declared == listed - {"docstring-parser"}
    assert all("==" in line for line in lines)
    assert {"torch", "torchvision", "deepspeed", "jsonargparse"} <= declared
    assert "apex" not in declared
    # --help reads field docstrings through docstring-parser, which the "signatures" extra brings
    assert any(dep.startswith("jsonargparse[signatures]") for dep in project["dependencies"])
    assert _requirement_names(project["optional-dependencies"]["test"]) == _requirement_names(
        (REPO / "requirements-test.txt").read_text().splitlines())
    assert "version" in project["dynamic"]


def test_version(capsys):
    from violet_ds import __version__

    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert out.startswith(f"violet-ds {__version__} (python ")
    assert "torch " in out and "deepspeed " in out


def _help(capsys, command: str) -> str:
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    return out


def _options_without_help(text: str) -> list[str]:
    """Options whose help is only "(type: ..., default: ...)"."""
    lines = text.splitlines()
    bare = []
    for number, line in enumerate(lines):
        match = re.match(r"^  (--[\w.]+)", line)
        if not match or match.group(1).endswith((".help", "--config")) or match.group(1) in ("--help",):
            continue
        rest = line[len(match.group(0)):].split("  ", 1)
        own = rest[1].strip() if len(rest) > 1 else ""
        following = lines[number + 1].strip() if number + 1 < len(lines) else ""
        text_of_help = own or following
        if text_of_help.startswith("(type:") or text_of_help.startswith("(required, type:") \
                or text_of_help == "Path to a configuration file.":
            if text_of_help != "Path to a configuration file.":
                bare.append(match.group(1))
    return bare


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_training_help_describes_every_field_and_group(capsys, command):
    out = _help(capsys, command)
    assert "micro-batch size per process" in out
    assert "peak learning rate" in out
    # groups are titled by their purpose (class docstring), not by the dataclass signature
    assert "DataConfig(" not in out and "RunConfig(" not in out
    for title in ("Which network to build", "Where the frames and annotations are", "What the model is trained for",
                  "Optimizer (AdamW family)", "DeepSpeed engine:", "The run directory"):
        assert title in out, title
    assert _options_without_help(out) == []


def test_data_source_help_describes_its_keys(capsys):
    code, out, _ = _run(capsys, "pretrain", "--data.train.help", "DataSource")
    assert code == 0
    assert "TSV path, glob or comma-separated list of shards" in out
    assert _options_without_help(out) == []


def test_extract_frames_help(capsys):
    out = _help(capsys, "extract-frames")
    assert "frames per video" in out and "rows per TSV shard" in out
    assert _options_without_help(out) == []


def test_resolved_config_is_dumped_without_deprecated_calls(tmp_path, capsys):
    """parse_command resolves the YAML (None values kept) through jsonargparse's current API."""
    import warnings

    from violet_ds import cli

    tsv = tmp_path / "a.tsv"
    tsv.write_text("v1\tframe\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        command = cli.parse_command("build-index", ["--tsv", str(tsv)])
        assert command() == 0
    assert "force: false" in command.resolved_yaml and f"tsv: {tsv}" in command.resolved_yaml
    from violet_ds.data.tsv import lineidx_path

    assert lineidx_path(tsv).is_file()


def test_every_command_documents_every_option(capsys):
    from violet_ds.cli import COMMANDS

    undocumented = {}
    for name in COMMANDS:
        code, out, _ = _run(capsys, *name.split(), "--help")
        assert code == 0, name
        if _options_without_help(out):
            undocumented[name] = _options_without_help(out)
    assert undocumented == {}
