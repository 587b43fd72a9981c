"""A held-out motion multiple-choice task in the official TGIF-Action format, for confirmation only.

The demo recipes (launch/configs/demo_*.yaml) must never be tuned on this data: it exists to check
that a recipe that learns the demo's own motion QA also learns a near neighbour of it. It differs
from `violet_ds/data/demo.py` on purpose in everything but the task itself:
- colours (orange, purple, cyan, pink, grey), shapes (ring, diamond, cross, bar) and continuous,
  mostly smaller sizes;
- 0-2 static distractor shapes of other colours in every clip;
- speeds from a quarter to a half of the frame per clip, with a random start phase;
- a smooth colour gradient background with per-clip noise instead of a flat one;
- five answers (left, right, up, down, stays) in other words ("where does the ... go ?",
  "it goes to the left", ..., "it stays where it is"), options in random order.

Output (the official layout the demo uses): `out/video_000.tsv` (+ `.lineidx`, written by the
project's `TSVWriter`; one row per clip: `video_id \\t b64 JPEG \\t ...`), `out/txt_qamc.json`
`{"train"|"val"|"test": [{"question", "option_0".."option_4", "answer", "video"}]}`, and for
pretraining on it `out/txt_pretrain.json` (`{"train"|"val"|"test": {video: [captions]}}`, the same
splits; "the orange ring goes to the left", ...) with its own WordPiece vocabulary in `out/tokenizer/`
(built by the demo's `train_tokenizer` from this text, "true" / "false" included for LAVENDER-style
matching). Frames are rendered straight to JPEG (no mp4 round trip). A function of (num_videos,
frames, size, seed).

    python tests/heldout_motion.py --out data/heldout_motion --num_videos 900
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLORS = {"orange": (245, 140, 20), "purple": (150, 60, 200), "cyan": (40, 220, 220), "pink": (250, 120, 190),
          "grey": (150, 150, 150)}
SHAPES = ("ring", "diamond", "cross", "bar")
MOTIONS = ("left", "right", "up", "down", "stays")
CAPTIONS = ("the {color} {shape} {motion}", "one {color} {shape} : {motion}")
ANSWERS = {"left": "it goes to the left", "right": "it goes to the right", "up": "it goes upwards",
           "down": "it goes downwards", "stays": "it stays where it is"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "stays": (0, 0)}


def shape_mask(shape: str, off_x: np.ndarray, off_y: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of `shape` centred at offset 0 (off_x/off_y broadcast over frames and pixels)."""
    if shape == "ring":
        dist = np.sqrt(off_x ** 2 + off_y ** 2)
        return (dist <= radius) & (dist >= radius * 0.5)
    if shape == "diamond":
        return np.abs(off_x) + np.abs(off_y) <= radius
    if shape == "cross":
        arm = radius * 0.35
        return ((np.abs(off_x) <= arm) & (np.abs(off_y) <= radius)) | ((np.abs(off_y) <= arm) & (np.abs(off_x) <= radius))
    if shape == "bar":
        return (np.abs(off_x) <= radius) & (np.abs(off_y) <= radius * 0.45)
    raise ValueError(f"unknown shape {shape!r}")


def render(color: str, shape: str, motion: str, distractors: list[tuple[str, str, float, float, float]],
           frames: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 `(frames, side, side, 3)`: one moving (or staying) target over static distractors."""
    radius = side * rng.uniform(0.06, 0.13)
    travel = side * rng.uniform(0.25, 0.5)
    margin = radius + 1
    dx, dy = DIRECTIONS[motion]
    low_x, high_x = margin + (travel if dx < 0 else 0), side - margin - (travel if dx > 0 else 0)
    low_y, high_y = margin + (travel if dy < 0 else 0), side - margin - (travel if dy > 0 else 0)
    start_x, start_y = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
    # constant speed, with the motion spread over all frames (a random sub-pixel phase)
    progress = np.clip(np.linspace(0.0, 1.0, frames) + rng.uniform(-0.03, 0.03), 0.0, 1.0)
    grid_y, grid_x = np.mgrid[0:side, 0:side].astype(np.float32)
    top, bottom = rng.integers(0, 90, size=3), rng.integers(0, 90, size=3)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    background = (1 - ramp) * top + ramp * bottom + rng.normal(0.0, 8.0, size=(side, side, 3))
    clip = np.broadcast_to(background, (frames, side, side, 3)).astype(np.float32).copy()
    for d_color, d_shape, d_radius, d_x, d_y in distractors:
        clip[:, shape_mask(d_shape, grid_x - d_x, grid_y - d_y, d_radius)] = COLORS[d_color]
    centre_x = (start_x + dx * travel * progress)[:, None, None]
    centre_y = (start_y + dy * travel * progress)[:, None, None]
    clip[shape_mask(shape, grid_x[None] - centre_x, grid_y[None] - centre_y, radius)] = COLORS[color]
    return np.clip(clip, 0, 255).astype(np.uint8)


def split_of(position: float) -> str:
    return "train" if position < 0.7 else ("val" if position < 0.85 else "test")


def make_heldout_motion(out: str, num_videos: int = 900, frames: int = 8, size: int = 64, seed: int = 0,
                        prefix: str = "hm") -> dict:
    """Render `num_videos` clips into `out/video_000.tsv` and write `out/txt_qamc.json`; returns the counts."""
    from violet_ds.data.frames import encode_b64_jpeg
    from violet_ds.data.tsv import TSVWriter

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 13])
    order = rng.permutation(num_videos)
    records: dict[str, list] = {"train": [], "val": [], "test": []}
    captions: dict[str, dict] = {"train": {}, "val": {}, "test": {}}
    with TSVWriter(root / "video_000.tsv") as writer:
        for index in range(num_videos):
            clip_rng = np.random.default_rng([seed, 13, index])
            video = f"{prefix}{index:05d}"
            color = str(clip_rng.choice(list(COLORS)))
            shape = str(clip_rng.choice(SHAPES))
            motion = MOTIONS[index % len(MOTIONS)]
            distractors = []
            for _ in range(int(clip_rng.integers(0, 3))):
                d_color = str(clip_rng.choice([c for c in COLORS if c != color]))
                d_radius = size * clip_rng.uniform(0.05, 0.1)
                distractors.append((d_color, str(clip_rng.choice(SHAPES)), d_radius,
                                    clip_rng.uniform(d_radius, size - d_radius), clip_rng.uniform(d_radius, size - d_radius)))
            clip = render(color, shape, motion, distractors, frames, size, clip_rng)
            writer.write([video] + [encode_b64_jpeg(frame, 90) for frame in clip])
            options = [ANSWERS[m] for m in clip_rng.permutation(MOTIONS)]
            record = {"question": f"where does the {color} {shape} go ?"}
            record.update({f"option_{k}": option for k, option in enumerate(options)})
            record.update({"answer": options.index(ANSWERS[motion]), "video": video})
            split = split_of(order[index] / num_videos)
            records[split].append(record)
            # captions from the drawn attributes only (no extra draws: the QA data stays as it was)
            motion_text = ANSWERS[motion].removeprefix("it ")
            captions[split][video] = [form.format(color=color, shape=shape, motion=motion_text) for form in CAPTIONS]
    (root / "txt_qamc.json").write_text(json.dumps(records, indent=1))
    (root / "txt_pretrain.json").write_text(json.dumps(captions, indent=1))
    from violet_ds.data.demo import train_tokenizer

    texts = [text for split in captions.values() for rows in split.values() for text in rows]
    texts += [row[key] for split in records.values() for row in split
              for key in ("question", *(f"option_{k}" for k in range(len(MOTIONS))))] + ["true false"]
    train_tokenizer(texts, root / "tokenizer")
    counts = {split: len(rows) for split, rows in records.items()}
    (root / "heldout.json").write_text(json.dumps({"num_videos": num_videos, "frames": frames, "size": size,
                                                   "seed": seed, "splits": counts}, indent=1))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/heldout_motion")
    parser.add_argument("--num_videos", type=int, default=900)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = make_heldout_motion(args.out, args.num_videos, args.frames, args.size, args.seed)
    print(f"held-out motion QA in {args.out}: {counts}")


if __name__ == "__main__":
    main()
