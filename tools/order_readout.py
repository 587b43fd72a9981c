"""Where is the order of events lost? Trained read-outs of a labelled build of `tests/heldout_order.py`.

`readout`: classify the ordered pair of moves (12 classes for `--kind order`, chance 8.3%) from 4 frames, no
text, training on the build's train split and printing test accuracy after every epoch, with one of:
- `cnn`: a 3-layer 3D CNN on the raw frames, from scratch (is the order in the pixels at this size?);
- `flat`: violet-tiny's video encoder + a linear layer on its flattened tokens (every token keeps its place);
- `fusion`: the whole model, the video through the cross-modal layers (with an empty text) and a linear layer on
  the [CLS] output, as every violet_ds head reads it.
`--run DIR` starts the encoder / model from a run's weights (`violet_ds.pretrained.load_run`), otherwise from
a random init. `--patch T,H,W` changes the random model's tubelet. `--head score` reads out with violet_ds's
ScoreHead (an MLP whose last layer starts at zero) instead of a linear layer. `--save DIR` writes the trained run
model (with `--run`) as a model directory, which `violet-ds finetune --run.init_from DIR` can start from.

`mlm`: how often a pretraining run's MLM head names the motion word of its own training captions when that
word is masked ("a big red circle moves [MASK]"; with two-move captions, each of the two words in turn), among
left / right / up / down (chance 25%).

    python tests/heldout_order.py --kind order --out /tmp/order --seed 4242
    python tools/order_readout.py readout --data /tmp/order --model flat --run runs/demo
    python tools/order_readout.py readout --data /tmp/order --model fusion --run runs/demo --epochs 30
    python tools/order_readout.py mlm --run runs/demo --data data/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from violet_ds.data.datasets import ClipReader, FrameSource
from violet_ds.data.frames import normalize
from violet_ds.data.tokenizer import Tokenizer
from violet_ds.models import create_model
from violet_ds.models.heads import ScoreHead
from violet_ds.pretrained import load_run, save_pretrained
from violet_ds.tasks.common import encode_video, fuse_pairs, pooled_of

MOVES = ("left", "right", "up", "down")
PAIRS = [(a, b) for a in MOVES for b in MOVES if a != b]


def labelled_clips(data: Path, frames: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 clips `(N, T, 3, 64, 64)` (evaluation sampling), ordered-pair labels and splits of a build."""
    events = json.loads((data / "labels.json").read_text())
    splits = {r["video"]: s for s, rows in json.loads((data / "txt_qamc.json").read_text()).items() for r in rows}
    source, reader = FrameSource(str(data / "video_*.tsv")), ClipReader(frames, 64, train=False)
    videos = sorted(splits)
    clips = torch.stack([reader(source.frames(v))[0] for v in videos])
    return clips, torch.tensor([PAIRS.index(tuple(events[v])) for v in videos]), [splits[v] for v in videos]


class Readout(nn.Module):
    def __init__(self, kind: str, run: str | None, patch: tuple[int, int, int] | None, example: torch.Tensor,
                 head: str = "linear"):
        super().__init__()
        self.kind = kind
        self.loaded = None
        if kind == "cnn":
            self.net = nn.Sequential(nn.Conv3d(3, 16, (1, 3, 3), (1, 2, 2), (0, 1, 1)), nn.ReLU(),
                                     nn.Conv3d(16, 32, (2, 3, 3), (1, 2, 2), (0, 1, 1)), nn.ReLU(),
                                     nn.Conv3d(32, 64, (2, 3, 3), (1, 2, 2), (0, 1, 1)), nn.ReLU(), nn.Flatten())
        elif run:
            self.loaded = load_run(run, mvm=False)
            self.model = self.loaded.task.model
        else:
            swin = {"patch_size": patch} if patch else {}
            self.model = create_model("violet-tiny", vocab_size=384, max_frames=8, swin_overrides=swin)
        with torch.no_grad():
            width = self.features(example).shape[1]
        self.head = nn.Linear(width, len(PAIRS)) if head == "linear" else ScoreHead(width, len(PAIRS), dropout=0.0)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        if self.kind == "cnn":
            return self.net(clips.float().div(255).transpose(1, 2))
        if self.kind == "flat":
            return self.model.encode_video(normalize(clips)).flatten(1)
        tokens, mask = encode_video(self.model, clips)
        empty = torch.tensor([[2, 3]]).expand(len(clips), -1)  # [CLS] [SEP] in every violet_ds vocabulary
        return pooled_of(fuse_pairs(self.model, tokens, mask, empty, torch.ones_like(empty)), tokens.shape[1])

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clips))


def readout(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    clips, labels, splits = labelled_clips(Path(args.data), args.frames)
    train = torch.tensor([s == "train" for s in splits])
    test = torch.tensor([s == "test" for s in splits])
    patch = tuple(int(x) for x in args.patch.split(",")) if args.patch else None
    if args.save and not (args.run and args.model != "cnn"):
        raise SystemExit("--save writes a run's model: give --run and --model flat or fusion")
    model = Readout(args.model, args.run, patch, clips[:2], args.head)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=1e-3)
    x_train, y_train = clips[train], labels[train]
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x_train)).split(args.batch_size):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(part).argmax(1) for part in clips[test].split(64)])
        accuracy = 100 * predicted.eq(labels[test]).float().mean().item()
        print(f"{args.model} epoch {epoch + 1}: train loss {loss.item():.3f}, test {accuracy:.1f}% "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.save:
        save_pretrained(model.loaded.task, args.save)
        print(f"model directory {args.save}")


@torch.no_grad()
def mlm(args: argparse.Namespace) -> None:
    task = load_run(args.run, mvm=False).task.eval()
    data = Path(args.data)
    tokenizer = Tokenizer(data / "tokenizer")
    move_ids = [tokenizer.token_id(m) for m in MOVES]
    source, reader = FrameSource(str(data / "video_*.tsv")), ClipReader(args.frames, 64, train=False)
    right: dict = {"one move": [0, 0], "first of two": [0, 0], "second of two": [0, 0]}
    for video, captions in json.loads((data / "txt_pretrain.json").read_text())["train"].items():
        if " moves " not in captions[0] or captions[0].endswith("still"):
            continue
        head, words = captions[0].split(" moves ")
        moves = words.split(" then ")
        tokens, mask = encode_video(task.model, reader(source.frames(video))[0][None])
        for place, word in enumerate(moves):
            masked = moves.copy()
            masked[place] = tokenizer.hf.mask_token
            ids, text_mask = tokenizer.encode([f"{head} moves {' then '.join(masked)}"], 32)
            hidden = fuse_pairs(task.model, tokens, mask, ids, text_mask)
            at = int((ids[0] == tokenizer.mask_id).nonzero()[0, 0]) + tokens.shape[1]
            logits = task.heads["mlm"](hidden[:, at]).float()[0, move_ids]
            key = "one move" if len(moves) == 1 else ("first of two", "second of two")[place]
            right[key][0] += MOVES[int(logits.argmax())] == word
            right[key][1] += 1
    for key, (correct, total) in right.items():
        if total:
            print(f"{key}: {correct}/{total} = {100 * correct / total:.1f}% (chance 25%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("readout", help="train a read-out of the ordered pair of moves")
    one.add_argument("--data", required=True, help="a build of tests/heldout_order.py --kind order")
    one.add_argument("--model", choices=("cnn", "flat", "fusion"), default="flat")
    one.add_argument("--run", help="start from this run's weights (default: random init)")
    one.add_argument("--patch", help="tubelet T,H,W of the random violet-tiny (default 2,8,8)")
    one.add_argument("--head", choices=("linear", "score"), default="linear")
    one.add_argument("--save", help="write the trained model (needs --run) as a model directory here")
    one.add_argument("--frames", type=int, default=4)
    one.add_argument("--epochs", type=int, default=12)
    one.add_argument("--batch_size", type=int, default=16)
    one.add_argument("--lr", type=float, default=3e-4)
    one.add_argument("--seed", type=int, default=0)
    two = commands.add_parser("mlm", help="MLM accuracy on the motion words of a run's own training captions")
    two.add_argument("--run", required=True)
    two.add_argument("--data", required=True, help="the demo build the run was pretrained on")
    two.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()
    readout(args) if args.command == "readout" else mlm(args)


if __name__ == "__main__":
    main()
