"""The held-out temporal-order generator (tests/heldout_order.py) asks what it claims to ask."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout_order import KINDS, NUM_OPTIONS, make_clip, make_heldout_order  # noqa: E402


@pytest.mark.parametrize("kind", KINDS)
def test_every_record_has_its_answer_and_the_reversed_order_among_the_options(kind):
    for index in range(24):
        clip, drawn = make_clip(kind, index, 8, 64, seed=7)
        record = drawn["record"]
        options = [record[f"option_{k}"] for k in range(NUM_OPTIONS)]
        assert clip.shape == (8, 64, 64, 3) and clip.dtype == np.uint8
        assert len(set(options)) == NUM_OPTIONS
        answer = options[record["answer"]]
        assert drawn["caption"].endswith(answer.removeprefix("it "))
        if kind != "count":  # the same two events in the other order is always a wrong option
            assert drawn["reverse"] in options and drawn["reverse"] != answer


def test_two_motions_move_the_shape_one_way_then_the_other():
    clip, drawn = make_clip("order", 0, 9, 64, seed=11)
    first, second = drawn["events"]
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    diff = np.abs(clip.astype(int) - np.median(clip, axis=0).astype(int)).sum(-1)
    # the shape's colour is saturated: track the pixels far from the per-pixel median
    centres = [np.argwhere(d > 120).mean(0)[::-1] for d in diff]
    assert np.dot(centres[4] - centres[0], steps[first]) > 5
    assert np.dot(centres[8] - centres[4], steps[second]) > 5


def test_a_build_writes_the_official_layout(tmp_path):
    counts = make_heldout_order(str(tmp_path), "event", num_videos=20, frames=4, size=32, seed=3)
    assert sum(counts.values()) == 20
    qa = json.loads((tmp_path / "txt_qamc.json").read_text())
    assert {"question", "option_0", "option_4", "answer", "video"} <= set(qa["train"][0])
    assert (tmp_path / "video_000.lineidx").is_file() and (tmp_path / "tokenizer" / "vocab.txt").is_file()
    assert len(json.loads((tmp_path / "labels.json").read_text())) == 20


def test_order_readout_tool_trains_each_readout(tmp_path, capsys):
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("order_readout", Path(__file__).parents[1] / "tools" / "order_readout.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    make_heldout_order(str(tmp_path / "order"), kind="order", num_videos=40, seed=3)
    clips, labels, splits = tool.labelled_clips(tmp_path / "order", 4)
    assert clips.shape == (40, 4, 3, 64, 64) and labels.max() < len(tool.PAIRS) and "test" in splits
    args = dict(data=str(tmp_path / "order"), run=None, patch=None, frames=4, epochs=1, batch_size=16, lr=3e-4,
                seed=0, head="linear", save=None)
    for model, head in (("cnn", "linear"), ("flat", "linear"), ("fusion", "linear"), ("fusion", "score")):
        tool.readout(types.SimpleNamespace(**{**args, "model": model, "head": head}))
        assert f"{model} epoch 1: train loss" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--save"):
        tool.readout(types.SimpleNamespace(**{**args, "model": "fusion", "save": str(tmp_path / "model")}))
