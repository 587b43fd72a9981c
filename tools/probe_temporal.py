"""Is the order of events visible in a model's video tokens? A linear probe, no text involved.

Reads a run's video encoder (`violet_ds.pretrained.load_run`), encodes every clip of a labelled build of
`tests/heldout_order.py` (its `labels.json` holds the drawn events) with evaluation sampling, and fits a
softmax-regression probe on the train split's tokens; prints test accuracy for:
- `ordered`: which ordered pair of events (12 classes for `--kind order`): needs the order;
- `unordered`: which pair, order ignored (6 classes): needs only the events;
with the tokens flattened (positions kept) and mean-pooled (positions lost, as far as the fusion
layers would lose them without position embeddings), with and without the temporal position embedding,
and with the frames shuffled. Pure measurement: prints a table, writes nothing.

    python tests/heldout_order.py --kind order --out /tmp/order --seed 4242
    python tools/probe_temporal.py --run runs/demo --data /tmp/order --frames 4
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from violet_ds.data.datasets import ClipReader
from violet_ds.data.frames import normalize
from violet_ds.data.tsv import TSVFile
from violet_ds.models import build_model
from violet_ds.pretrained import load_run


def read_clips(data: Path, frames: int, size: int) -> tuple[torch.Tensor, list[str], dict]:
    """uint8 clips `(N, T, 3, H, W)` of every row, their video ids and {video: split}."""
    reader = ClipReader(frames, size, train=False)
    tsv = TSVFile(data / "video_000.tsv")
    clips, videos = [], []
    for row in range(len(tsv)):
        fields = tsv[row]
        clips.append(reader(fields[1:])[0])
        videos.append(fields[0])
    splits = {r["video"]: split for split, rows in json.loads((data / "txt_qamc.json").read_text()).items()
              for r in rows}
    return torch.stack(clips), videos, splits


@torch.no_grad()
def encode(model, clips: torch.Tensor, temporal_pos: bool, batch: int = 64) -> torch.Tensor:
    """Video tokens `(N, tokens, D)`; `temporal_pos=False` encodes with the temporal embedding zeroed."""
    saved = model.video_temporal_pos.detach().clone()
    if not temporal_pos:
        model.video_temporal_pos.zero_()
    try:
        return torch.cat([model.encode_video(normalize(clips[i:i + batch])) for i in range(0, len(clips), batch)])
    finally:
        model.video_temporal_pos.copy_(saved)


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              classes: int, steps: int = 400, weight_decay: float = 1e-3) -> float:
    """Softmax regression on standardised features (full-batch Adam); test accuracy in %."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * (probe(x_test).argmax(1) == y_test).float().mean().item()


def targets(events: list[list[str]]) -> dict[str, tuple[torch.Tensor, int]]:
    ordered = sorted({tuple(e) for e in events})
    unordered = sorted({tuple(sorted(e)) for e in events})
    return {"ordered": (torch.tensor([ordered.index(tuple(e)) for e in events]), len(ordered)),
            "unordered": (torch.tensor([unordered.index(tuple(sorted(e))) for e in events]), len(unordered))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory (its latest checkpoint is read)")
    parser.add_argument("--data", required=True, help="a build of tests/heldout_order.py")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--random_init", action="store_true", help="the run's architecture, freshly initialised")
    args = parser.parse_args()
    data = Path(args.data)
    loaded = load_run(args.run, mvm=False)
    model = (build_model(loaded.model_cfg) if args.random_init else loaded.task.model).eval()
    clips, videos, splits = read_clips(data, args.frames, args.size)
    labels = json.loads((data / "labels.json").read_text())
    train = torch.tensor([splits[v] == "train" for v in videos])
    test = torch.tensor([splits[v] == "test" for v in videos])
    # every clip its own frame order (a fixed permutation would only relabel the classes)
    generator = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(args.frames, generator=generator) for _ in range(len(clips))])
    shuffled = clips[torch.arange(len(clips))[:, None], orders]
    print(f"{len(videos)} clips ({int(train.sum())} train, {int(test.sum())} test), {args.frames} frames, "
          f"{args.size} px, run {args.run}")
    print(f"{'frames':<9}{'temporal pos':<14}{'pool':<6}" + "".join(f"{name:>11}" for name in ("ordered", "unordered")))
    goals = targets([labels[v] for v in videos])
    for (order_name, video), temporal_pos in itertools.product((("kept", clips), ("shuffled", shuffled)), (True, False)):
        tokens = encode(model, video, temporal_pos)
        for pool, features in (("flat", tokens.flatten(1)), ("mean", tokens.mean(1))):
            row = [fit_probe(features[train], y[train], features[test], y[test], k) for y, k in goals.values()]
            print(f"{order_name:<9}{'with' if temporal_pos else 'without':<14}{pool:<6}"
                  + "".join(f"{acc:>10.1f}%" for acc in row))
    print("chance: " + ", ".join(f"{name} {100 / k:.1f}%" for name, (_, k) in goals.items()))


if __name__ == "__main__":
    main()
