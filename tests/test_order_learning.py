"""Learning the order of events on held-out data (tests/heldout_order.py, kind `order`: "it goes to the left and
then upwards", the reversed order always among the five options). The target: the demo QA recipe, with its text
long enough for two events (`data.max_text_len: 48`) and the video-only answer loss (`task.options.video_answer_loss:
1.0`), finetuned from the README's main job (runs/demo), answers for every seed with 4 frames, stays near chance
with 1 frame, and drops towards chance when the same checkpoint sees its frames in another order
(`data.frame_order: shuffle`). Measured, and why the loss is needed: docs/results.md#temporal-order.

Slow: per seed two real `violet-ds finetune` runs (4 frames and 1 frame, the recipe's 8000 steps each) and three
`violet-ds evaluate` runs on CPU, about an hour a seed on 2 cores. Needs `bash tools/demo.sh` to have run first.
Each seed gets its own build (generator seeds 600-602, never used to choose anything: that was build 4242).
Keep the runs with `--basetemp DIR -s`:

    python -m pytest -m slow tests/test_order_learning.py -s
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from heldout_order import make_heldout_order  # noqa: E402
from test_motion_learning import DEMO_RUN, finetune_and_test  # noqa: E402

ORDER = {"data": {"max_text_len": 48}, "task": {"options": {"video_answer_loss": 1.0}}}
"""The recipe for questions about the order of events: question + option take up to 43 word pieces of the demo
vocabulary (its words are not all in it), and the video path is asked for the answer on its own
(`video_answer_loss`, tasks/qa_mc.py)."""


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_RUN.is_dir(), reason="needs the demo pretraining run (bash tools/demo.sh)")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_recipe_learns_the_order_of_two_motions(tmp_path, seed):
    data = tmp_path / "heldout"
    make_heldout_order(str(data), kind="order", num_videos=1500, seed=600 + seed)
    four = finetune_and_test(tmp_path, data, seed, frames=4, task="held-out order", overrides=ORDER, shuffled=True)
    one = finetune_and_test(tmp_path, data, seed, frames=1, task="held-out order", overrides=ORDER)["test"]
    report = f"seed {seed}: 4 frames {four['test']:.1f}%, shuffled {four['shuffled']:.1f}%, 1 frame {one:.1f}%"
    assert four["test"] >= 90.0, report
    assert one <= 40.0, report + ": the task leaks the answer without motion"
    assert four["shuffled"] <= 45.0, report + ": the answer does not depend on the order of the frames"
