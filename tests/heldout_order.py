"""Held-out temporal-order tasks in the official TGIF-Action format, for measuring only.

A clip shows one shape doing two things, one in each half of the clip; the question is which came
first. No recipe may be tuned on builds of this generator that are reported: pick fresh seeds for a
report. Three kinds (`kind`):
- `order`: two motions, "it goes to the left and then upwards"; the options always hold the reversed
  order of the right answer and three other ordered pairs;
- `event`: a colour change and a motion, "it turns green and then goes upwards" against "it goes upwards
  and then turns green"; the other options change the colour or the direction;
- `count`: how many times the shape moves (once, twice, three times, never) over the clip, with a pause
  between moves.
Looks differ from the demo data (`violet_ds/data/demo.py`) on purpose: the shapes, colours, sizes and
backgrounds of `tests/heldout_motion.py`, with 0-2 static distractors.

Output, as the demo writes it: `out/video_000.tsv` (+ `.lineidx`; `video_id \\t b64 JPEG ...`, `frames`
frames per row), `out/txt_qamc.json` (`{"train"|"val"|"test": [{"question", "option_0".."option_4",
"answer", "video"}]}`), `out/txt_pretrain.json` (one caption per clip, the right answer as a sentence)
and `out/tokenizer/` (a WordPiece vocabulary of all the text). `out/labels.json` keeps, per video, the
drawn events (for probes that need no text). A function of (kind, num_videos, frames, size, seed).

    python tests/heldout_order.py --kind order --out data/heldout_order --num_videos 1500 --seed 400
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from heldout_motion import COLORS, SHAPES, shape_mask, split_of

KINDS = ("order", "event", "count")
MOVES = ("left", "right", "up", "down")
GOES = {"left": "goes to the left", "right": "goes to the right", "up": "goes upwards", "down": "goes downwards"}
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = ("it never moves", "it moves once", "it moves twice", "it moves three times")
NUM_OPTIONS = 5


def _background(side: int, rng: np.random.Generator) -> np.ndarray:
    top, bottom = rng.integers(0, 90, size=3), rng.integers(0, 90, size=3)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    return (1 - ramp) * top + ramp * bottom + rng.normal(0.0, 8.0, size=(side, side, 3))


def _fit_start(offsets: np.ndarray, margin: float, side: int, rng: np.random.Generator) -> np.ndarray:
    """A start point such that start + every offset `(frames, 2)` stays `margin` inside the frame."""
    low = margin - offsets.min(axis=0)
    high = side - margin - offsets.max(axis=0)
    return rng.uniform(low, np.maximum(high, low + 1e-3))


def _two_moves(first: str, second: str, frames: int, travel: float) -> np.ndarray:
    """`(frames, 2)` offsets: `first` over the first half of the clip, `second` over the second half."""
    progress = np.linspace(0.0, 1.0, frames)
    one, two = np.clip(2 * progress, 0, 1)[:, None], np.clip(2 * progress - 1, 0, 1)[:, None]
    return travel * (one * np.array(STEPS[first]) + two * np.array(STEPS[second]))


def _bursts(moves: list[str], frames: int, travel: float) -> np.ndarray:
    """`(frames, 2)` offsets: the clip in 2k+1 equal slots, the k moves in slots 1, 3, ... (pauses between)."""
    slots = 2 * max(len(moves), 1) + 1
    time = np.linspace(0.0, 1.0, frames) * slots
    offsets = np.zeros((frames, 2))
    for k, move in enumerate(moves):
        done = np.clip(time - (2 * k + 1), 0, 1)[:, None]
        offsets += travel * done * np.array(STEPS[move])
    return offsets


def render(offsets: np.ndarray, colors: np.ndarray, shape: str, distractors: list, side: int,
           rng: np.random.Generator) -> np.ndarray:
    """uint8 `(frames, side, side, 3)`: the shape at start + offsets[f] in colors[f], over static distractors."""
    radius = side * rng.uniform(0.07, 0.11)
    start = _fit_start(offsets, radius + 1, side, rng)
    grid_y, grid_x = np.mgrid[0:side, 0:side].astype(np.float32)
    clip = np.broadcast_to(_background(side, rng), (len(offsets), side, side, 3)).astype(np.float32).copy()
    for d_color, d_shape, d_radius, d_x, d_y in distractors:
        clip[:, shape_mask(d_shape, grid_x - d_x, grid_y - d_y, d_radius)] = COLORS[d_color]
    centre = start + offsets
    inside = shape_mask(shape, grid_x[None] - centre[:, 0, None, None], grid_y[None] - centre[:, 1, None, None], radius)
    for f in range(len(offsets)):  # a handful of frames per clip, rendered once when the data is built
        clip[f][inside[f]] = colors[f]
    return np.clip(clip, 0, 255).astype(np.uint8)


def _distractors(color: str, side: int, rng: np.random.Generator, avoid: tuple = ()) -> list:
    out = []
    for _ in range(int(rng.integers(0, 3))):
        d_color = str(rng.choice([c for c in COLORS if c != color and c not in avoid]))
        d_radius = side * rng.uniform(0.04, 0.08)
        out.append((d_color, str(rng.choice(SHAPES)), d_radius, rng.uniform(d_radius, side - d_radius),
                    rng.uniform(d_radius, side - d_radius)))
    return out


def _options(answer: str, hard: list[str], pool: list[str], rng: np.random.Generator) -> tuple[list[str], int]:
    """Five options: the answer, every `hard` distractor, the rest drawn from `pool`; shuffled."""
    others = [o for o in pool if o != answer and o not in hard]
    picked = [answer, *hard, *rng.choice(others, size=NUM_OPTIONS - 1 - len(hard), replace=False).tolist()]
    order = rng.permutation(NUM_OPTIONS)
    options = [picked[k] for k in order]
    return options, options.index(answer)


def make_clip(kind: str, index: int, frames: int, side: int, seed: int) -> tuple[np.ndarray, dict]:
    """One clip and its record (question, options, answer index, the drawn events)."""
    rng = np.random.default_rng([seed, 17, index])
    color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    travel = side * rng.uniform(0.22, 0.3)
    colors = np.tile(np.array(COLORS[color], dtype=np.float32), (frames, 1))
    if kind == "order":
        first, second = (str(m) for m in rng.choice(MOVES, size=2, replace=False))
        offsets = _two_moves(first, second, frames, travel)
        pool = [f"it {GOES[a]} and then {GOES[b].removeprefix('goes ')}" for a in MOVES for b in MOVES if a != b]
        answer = f"it {GOES[first]} and then {GOES[second].removeprefix('goes ')}"
        reverse = f"it {GOES[second]} and then {GOES[first].removeprefix('goes ')}"
        options, label = _options(answer, [reverse], pool, rng)
        question, events = f"what does the {color} {shape} do ?", [first, second]
        avoid = ()
    elif kind == "event":
        move = str(rng.choice(MOVES))
        new = str(rng.choice([c for c in COLORS if c != color]))
        turn_first = bool(rng.integers(0, 2))
        progress = np.linspace(0.0, 1.0, frames)
        # the move fills one half of the clip; the colour changes in the middle of the other half
        moving = np.clip(2 * progress - (1 if turn_first else 0), 0, 1)
        offsets = travel * moving[:, None] * np.array(STEPS[move])
        colors[progress >= (0.25 if turn_first else 0.75)] = COLORS[new]
        go = GOES[move]
        phrase = {True: f"it turns {new} and then {go}", False: f"it {go} and then turns {new}"}
        answer, reverse = phrase[turn_first], phrase[not turn_first]
        pool = [f"it turns {c} and then {GOES[m]}" for c in COLORS for m in MOVES if c != color]
        pool += [f"it {GOES[m]} and then turns {c}" for c in COLORS for m in MOVES if c != color]
        options, label = _options(answer, [reverse], pool, rng)
        question, events = f"what happens to the {color} {shape} ?", ["turn", move] if turn_first else [move, "turn"]
        avoid = (new,)
    elif kind == "count":
        times = int(index % len(COUNTS))
        moves = [str(m) for m in rng.choice(MOVES, size=times)]
        offsets = _bursts(moves, frames, travel * 0.8)
        pool = [*COUNTS, "it moves four times"]
        answer = COUNTS[times]
        options, label = _options(answer, [], pool, rng)
        question, events, reverse = f"how many times does the {color} {shape} move ?", moves, None
        avoid = ()
    else:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    clip = render(offsets, colors, shape, _distractors(color, side, rng, avoid), side, rng)
    record = {"question": question, **{f"option_{k}": o for k, o in enumerate(options)}, "answer": label}
    return clip, {"record": record, "events": events, "reverse": reverse,
                  "caption": answer.replace("it ", f"the {color} {shape} ", 1)}


def make_heldout_order(out: str, kind: str = "order", num_videos: int = 1500, frames: int = 8, size: int = 64,
                       seed: int = 400, prefix: str = "ho") -> dict:
    """Render `num_videos` clips of `kind` into `out/` (TSV, QA, captions, labels, tokenizer); returns counts."""
    from violet_ds.data.demo import train_tokenizer
    from violet_ds.data.frames import encode_b64_jpeg
    from violet_ds.data.tsv import TSVWriter

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([seed, 19]).permutation(num_videos)
    records: dict = {"train": [], "val": [], "test": []}
    captions: dict = {"train": {}, "val": {}, "test": {}}
    labels: dict = {}
    with TSVWriter(root / "video_000.tsv") as writer:
        for index in range(num_videos):
            video = f"{prefix}{index:05d}"
            clip, drawn = make_clip(kind, index, frames, size, seed)
            writer.write([video] + [encode_b64_jpeg(frame, 90) for frame in clip])
            split = split_of(order[index] / num_videos)
            records[split].append({**drawn["record"], "video": video})
            captions[split][video] = [drawn["caption"]]
            labels[video] = drawn["events"]
    (root / "txt_qamc.json").write_text(json.dumps(records, indent=1))
    (root / "txt_pretrain.json").write_text(json.dumps(captions, indent=1))
    (root / "labels.json").write_text(json.dumps(labels))
    texts = [text for split in captions.values() for rows in split.values() for text in rows]
    texts += [row[key] for split in records.values() for row in split
              for key in ("question", *(f"option_{k}" for k in range(NUM_OPTIONS)))] + ["true false"]
    train_tokenizer(texts, root / "tokenizer")
    counts = {split: len(rows) for split, rows in records.items()}
    (root / "heldout.json").write_text(json.dumps({"kind": kind, "num_videos": num_videos, "frames": frames,
                                                   "size": size, "seed": seed, "splits": counts}, indent=1))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, default="order")
    parser.add_argument("--out", default="data/heldout_order")
    parser.add_argument("--num_videos", type=int, default=1500)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=400)
    args = parser.parse_args()
    counts = make_heldout_order(args.out, args.kind, args.num_videos, args.frames, args.size, args.seed)
    print(f"held-out {args.kind} QA in {args.out}: {counts}")


if __name__ == "__main__":
    main()
