"""Can a model learn video-text matching at all? Overfit N demo pairs with the full N x N score matrix.

A healthy cross-modal model drives the loss far below ln(N) within a few hundred steps; a loss that
stays at ln(N) means the matching signal never reaches the score (see the open downstream issue).

    python tools/diagnose_matching.py --data data/demo --pairs 16 --steps 300 --model violet-tiny
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from violet_ds.data.datasets import PretrainDataset, collate
from violet_ds.data.frames import normalize
from violet_ds.data.tokenizer import load_tokenizer
from violet_ds.models import create_model
from violet_ds.models.heads import ScoreHead, head_dropout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="demo data folder (violet-ds make-demo-data)")
    parser.add_argument("--model", default="violet-tiny")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=0.05)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer(f"{args.data}/tokenizer")
    dataset = PretrainDataset(f"{args.data}/video_*.tsv", f"{args.data}/txt_pretrain.json", "train", tokenizer,
                              num_frames=args.frames, size=args.size, max_text_len=24, train=False)
    batch = collate([dataset[i] for i in range(args.pairs)])
    model = create_model(args.model, vocab_size=tokenizer.vocab_size)
    head = ScoreHead(model.hidden_size, 1, dropout=head_dropout(model))
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr)
    video = normalize(batch["video"])
    ids, mask = batch["text_ids"], batch["text_mask"]
    n = ids.shape[0]
    target = torch.arange(n)
    print(f"chance loss ln({n}) = {math.log(n):.3f}")
    for step in range(args.steps):
        video_tokens = model.encode_video(video)
        # every video against every text: row i's positive is text i
        hidden = model.fuse(video_tokens.repeat_interleave(n, 0), None, model.embed_text(ids.repeat(n, 1)),
                            mask.repeat(n, 1))
        scores = head(hidden[:, video_tokens.shape[1]]).view(n, n) / args.temperature
        loss = F.cross_entropy(scores, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            accuracy = (scores.argmax(1) == target).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.3f}  accuracy {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
