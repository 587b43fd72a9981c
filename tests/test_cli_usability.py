"""The command line as a user meets it: list options that take several values, one-line parse errors
with a suggestion, and the command overview grouped by job."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from violet_ds import cli


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# ---------------------------------------------------------------- list options take several values

@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    paths = [folder / f"{name}.mp4" for name in ("a", "b", "c d")]
    for path in paths:
        path.write_bytes(b"")
    return paths


def _predict_kwargs(*argv):
    return cli.parse_command("predict", ["--model", "m", *argv]).kwargs


def test_predict_takes_several_video_files(clips):
    """What an unquoted shell glob passes: every file, in order, and the options after them still parse."""
    kwargs = _predict_kwargs("--videos", *map(str, clips), "--top_k", "3")
    assert kwargs["videos"] == [str(path) for path in clips]
    assert kwargs["top_k"] == 3
    assert _predict_kwargs(f"--videos={clips[0]}", str(clips[1]))["videos"] == [str(clips[0]), str(clips[1])]


def test_predict_single_path_folder_and_glob_stay_one_string(clips, tmp_path):
    assert _predict_kwargs("--videos", str(clips[0]))["videos"] == str(clips[0])
    assert _predict_kwargs("--videos", str(clips[0].parent))["videos"] == str(clips[0].parent)
    pattern = str(clips[0].parent / "*.mp4")
    assert _predict_kwargs("--videos", pattern)["videos"] == pattern
    assert _predict_kwargs(f"--videos={pattern}")["videos"] == pattern


def test_predict_videos_from_yaml_one_or_several(clips, tmp_path):
    single = tmp_path / "single.yaml"
    single.write_text(f"videos: {clips[0]}\ntop_k: 2\n")
    several = tmp_path / "several.yaml"
    several.write_text(f"videos: [{clips[0]}, {clips[1]}]\n")
    assert _predict_kwargs("--config", str(single))["videos"] == str(clips[0])
    kwargs = _predict_kwargs("--config", str(single), "--config", str(several))
    assert kwargs["videos"] == [str(clips[0]), str(clips[1])] and kwargs["top_k"] == 2
    # a later flag overrides the files
    assert _predict_kwargs("--config", str(several), "--videos", str(clips[2]))["videos"] == str(clips[2])


def test_other_list_options_gather_values_too(clips):
    kwargs = _predict_kwargs("--videos", str(clips[0]), "--options", "yes", "no", "-1", "--question", "is it?")
    assert kwargs["options"] == ["yes", "no", "-1"] and kwargs["question"] == "is it?"
    assert _predict_kwargs("--videos", str(clips[0]), "--captions", "a dog runs")["captions"] == ["a dog runs"]
    # the YAML list form keeps working
    assert _predict_kwargs("--videos", str(clips[0]), "--captions", "[a dog, a cat]")["captions"] == ["a dog", "a cat"]


def test_gather_list_values_leaves_other_options_alone():
    func = cli.load_command("bench train")
    parser = cli.build_parser("bench train", func)
    argv = ["--config", "a.yaml", "--config", "b.yaml", "--models", "violet-tiny", "violet-v2",
            "--checkpointing", "true", "false", "--steps", "3"]
    assert cli.gather_list_values(parser, argv) == [
        "--config", "a.yaml", "--config", "b.yaml", "--models", json.dumps(["violet-tiny", "violet-v2"]),
        "--checkpointing", json.dumps(["true", "false"]), "--steps", "3"]
    # `--` ends the options; a YAML list or null is passed on as it is
    assert cli.gather_list_values(parser, ["--models", "[a, b]", "--", "x", "y"]) == ["--models", "[a, b]", "--", "x", "y"]
    assert cli.gather_list_values(parser, ["--models", "null"]) == ["--models", "null"]


def test_predict_runs_every_video_given(clips, capsys, monkeypatch):
    """predict reads each video of several --videos values once, in the order given."""
    from violet_ds import predict as predict_module

    class Unreadable:
        tokenizer = None

        def read(self, path):
            raise predict_module.VideoReadError("not a video")

    monkeypatch.setattr(predict_module.Predictor, "load", classmethod(lambda cls, *a, **k: Unreadable()))
    code, out, err = _run(capsys, "predict", "--model", "m", "--task", "caption", "--progress", "false",
                          "--videos", str(clips[1]), str(clips[0].parent), str(clips[1]))
    assert code == 1  # every video failed
    videos = [json.loads(line)["video"] for line in out.splitlines()]
    assert videos == [str(clips[1]), str(clips[0]), str(clips[2])]


# ---------------------------------------------------------------- parse errors are one line

def _error_lines(capsys, *argv):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) <= 2 and "usage:" not in err, err
    return lines


def test_misspelled_option_names_it_and_suggests_the_right_one(capsys):
    lines = _error_lines(capsys, "pretrain", "--optim.lrr", "1e-4")
    assert lines == ["violet-ds pretrain: error: unknown option --optim.lrr (did you mean --optim.lr?)",
                     "run 'violet-ds pretrain --help' for all options"]


def test_option_without_its_group_suggests_the_dotted_one(capsys):
    lines = _error_lines(capsys, "pretrain", "--lr=1e-4")
    assert "unknown option --lr (did you mean --optim.lr?)" in lines[0]


def test_unknown_option_without_close_match_still_one_line(capsys):
    lines = _error_lines(capsys, "pretrain", "--frobnicate", "3")
    assert lines == ["violet-ds pretrain: error: unknown option --frobnicate",
                     "run 'violet-ds pretrain --help' for all options"]


def test_wrong_type_names_the_key(capsys):
    lines = _error_lines(capsys, "pretrain", "--optim.lr", "abc")
    assert lines[0].startswith("violet-ds pretrain: error: --optim.lr: ") and "abc" in lines[0]
    assert lines[1] == "run 'violet-ds pretrain --help' for all options"


def test_bad_value_and_missing_option_name_the_key(capsys):
    lines = _error_lines(capsys, "predict", "--model", "m", "--videos", "x.mp4", "--task", "bogus")
    assert lines[0].startswith("violet-ds predict: error: --task: ") and "bogus" in lines[0]
    lines = _error_lines(capsys, "predict", "--model", "m")
    assert lines[0] == "violet-ds predict: error: missing required option --videos"


def test_stray_value_is_named(capsys):
    lines = _error_lines(capsys, "build-index", "--tsv", "a.tsv", "b.tsv")
    assert lines[0] == "violet-ds build-index: error: unexpected value b.tsv (every value follows its --option)"


def test_help_and_print_config_still_work(capsys, tmp_path):
    code, out, _ = _run(capsys, "build-index", "--help")
    assert code == 0 and "--tsv" in out
    code, out, _ = _run(capsys, "build-index", "--tsv", str(tmp_path / "a.tsv"), "--print_config")
    assert code == 0 and f"tsv: {tmp_path / 'a.tsv'}" in out


def test_console_entry_prints_the_short_error():
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("VIOLET_DS_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "violet_ds.cli", "pretrain", "--optim.lrr", "1e-4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "violet-ds pretrain: error: unknown option --optim.lrr (did you mean --optim.lr?)",
        "run 'violet-ds pretrain --help' for all options"]


# ---------------------------------------------------------------- overview grouped by job

@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_overview_lists_commands_under_their_group(capsys, argv):
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    lines = out.splitlines()
    headings = [f"{heading}:" for heading in cli.COMMAND_GROUPS]
    assert headings == ["prepare data:", "train:", "evaluate and predict:", "models and checkpoints:",
                        "benchmarks and checks:"]
    starts = [lines.index(heading) for heading in headings]
    assert starts == sorted(starts)
    for number, (heading, group) in enumerate(cli.COMMAND_GROUPS.items()):
        end = starts[number + 1] if number + 1 < len(starts) else len(lines)
        block = lines[starts[number] + 1:end]
        listed = [line.split("  ")[1].strip() for line in block if line.startswith("  ")]
        assert listed == list(group), heading
    assert {"pretrain", "finetune"} <= set(cli.COMMAND_GROUPS["train"])
    assert {"evaluate", "predict"} <= set(cli.COMMAND_GROUPS["evaluate and predict"])
    assert "bench gpu" in cli.COMMAND_GROUPS["benchmarks and checks"]


def test_commands_is_every_group_merged():
    assert cli.COMMANDS == {name: entry for group in cli.COMMAND_GROUPS.values() for name, entry in group.items()}
    assert sum(map(len, cli.COMMAND_GROUPS.values())) == len(cli.COMMANDS)  # no name in two groups
    target, help_ = cli.COMMANDS["predict"]
    assert target == "violet_ds.commands.predict:predict" and help_
