"""Why does a multiple-choice finetune sit at chance? Train a recipe's task in a plain loop and measure.

Builds model, task and data exactly as `violet-ds finetune --config X` does (same builders, same
init_from), then trains with AdamW + the recipe's warm-up/linear schedule and clipping (no DeepSpeed:
same update rule, easier to probe) and every `--probe_every` steps prints:
- loss, gradient norm (before clipping), and the gradient norm reaching the backbone;
- `spread`: std of the K option scores within a video (0 = collapsed to one constant);
- `video_dep`: std across videos of one option's score (does the score depend on the video at all);
- `dead`: share of the score head's hidden ReLU units that are zero for every pair of the batch;
- validation accuracy (and the first step it reaches `--target`%).

    python tools/diagnose_mc.py --config launch/configs/demo_qa_mc.yaml --steps 400 \
        --set data.num_frames=1 --set optim.lr=1e-4 --fresh_head
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
import yaml


def load_config(path: str, sets: list[str]) -> dict:
    cfg = yaml.safe_load(open(path))
    for item in sets:
        key, value = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return cfg


def build(cfg: dict):
    from violet_ds.config import DataConfig, DataSource, ModelConfig, OptimConfig, TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task

    data_cfg = dict(cfg["data"])
    for split in ("train", "val", "test"):
        data_cfg[split] = [DataSource(**source) for source in data_cfg.get(split, [])]
    data = DataConfig(**data_cfg)
    model_cfg = ModelConfig(**cfg["model"])
    task_cfg = TaskConfig(**cfg["task"])
    optim = OptimConfig(**{k: v for k, v in cfg.get("optim", {}).items()})
    tokenizer = Tokenizer(data.tokenizer)
    task = create_task(task_cfg.name, build_model(model_cfg), task_cfg, tokenizer,
                       tie_mlm_head=model_cfg.tie_mlm_head)
    return data, task, optim, tokenizer


def batches(dataset, batch_size: int, generator: torch.Generator, shuffle: bool):
    from violet_ds.data.datasets import collate

    order = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))
    for start in range(0, len(order) - (batch_size - 1 if shuffle else 0), batch_size):
        yield collate([dataset[int(i)] for i in order[start:start + batch_size]])


@torch.no_grad()
def evaluate(task, dataset, batch_size: int) -> float:
    task.eval()
    correct = total = 0
    for batch in batches(dataset, batch_size, torch.Generator(), shuffle=False):
        out = task.evaluate_step(batch)
        correct += int(((out["pred"] == out["answer"]) & (out["answer"] >= 0)).sum())
        total += len(out["answer"])
    task.train()
    return 100.0 * correct / max(total, 1)


def probe(task, batch) -> dict:
    """Score spread across options / across videos and dead ReLUs of the score head on one batch."""
    stats: dict[str, Any] = {}
    captured = {}
    head = task.heads["score"] if "score" in task.heads else None
    hook = None
    if head is not None:
        hook = head[2].register_forward_hook(lambda m, i, o: captured.__setitem__("relu", o.detach()))
    with torch.no_grad():
        logits, _ = task.option_logits(batch)
    if hook is not None:
        hook.remove()
        relu = captured["relu"]
        stats["dead"] = float((relu.flatten(0, -2) <= 0).all(dim=0).float().mean())
    stats["spread"] = float(logits.std(dim=1).mean())
    # the same option text is at a random position per video: compare scores of equal texts across videos
    ids = batch["option_ids"]
    keys = [tuple(row.tolist()) for row in ids.flatten(0, 1)]
    flat = logits.flatten()
    groups: dict = {}
    for key, value in zip(keys, flat.tolist()):
        groups.setdefault(key, []).append(value)
    spreads = [torch.tensor(v).std().item() for v in groups.values() if len(v) > 1]
    stats["video_dep"] = float(sum(spreads) / len(spreads)) if spreads else float("nan")
    return stats


class VideoProbe(torch.nn.Module):
    """Answer text as a class, predicted from the video tokens only (no text): a motion probe."""

    def __init__(self, task, train_set, frozen: bool, pool: str = "mean", frames: int = 4, size: int = 64):
        super().__init__()
        self.model = task.model
        self.heads = torch.nn.ModuleDict()
        self.frozen = frozen
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.classes: dict = {}
        self.sep_id = task.tokenizer.sep_id
        records = train_set.records if hasattr(train_set, "records") else None
        self.records = records
        self.pool = pool
        t, h, w = self.model.video_token_grid(frames, size, size)
        width = self.model.hidden_size * (1 if pool == "mean" else t * (1 + h * w))
        self.classifier = torch.nn.Linear(width, 8)

    def label(self, batch) -> torch.Tensor:
        ids = batch["option_ids"][torch.arange(len(batch["answer"])), batch["answer"]]
        labels = []
        sep = self.sep_id
        for row in ids.tolist():
            key = tuple(row[row.index(sep) + 1:]) if sep in row else tuple(row)  # the option after the question
            labels.append(self.classes.setdefault(key, len(self.classes)))
        return torch.tensor(labels)

    def logits(self, batch):
        from violet_ds.tasks.common import encode_video

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens, _ = encode_video(self.model, batch["video"])
        features = tokens.float().mean(dim=1) if self.pool == "mean" else tokens.float().flatten(1)
        return self.classifier(features)

    def forward(self, batch):
        logits = self.logits(batch)
        return {"loss": F.cross_entropy(logits, self.label(batch).to(logits.device))}

    def option_logits(self, batch):
        return self.logits(batch), None

    def evaluate_step(self, batch):
        label = self.label(batch)
        return {"pred": self.logits(batch).argmax(dim=1).cpu(), "answer": label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="launch/configs/demo_qa_mc.yaml")
    parser.add_argument("--set", action="append", default=[], help="dotted.key=yaml_value override")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--probe_every", type=int, default=50)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--target", type=float, default=90.0)
    parser.add_argument("--fresh_head", action="store_true", help="do not inherit heads.* from init_from")
    parser.add_argument("--no_init", action="store_true", help="random backbone (ignore run.init_from)")
    parser.add_argument("--eval_split", default="val")
    parser.add_argument("--freeze_backbone_steps", type=int, default=0,
                        help="train only the task heads for this many steps first")
    parser.add_argument("--video_probe", choices=["", "frozen", "finetune"], default="",
                        help="instead of the task: classify the answer text from the video alone (mean video "
                             "token -> linear), with the backbone frozen or trained: is the motion visible at all?")
    parser.add_argument("--test", action="store_true", help="also evaluate the test split at the end")
    parser.add_argument("--probe_pool", choices=["mean", "flat"], default="mean",
                        help="video probe features: the mean video token, or all video tokens concatenated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from violet_ds.commands.run import load_init_weights, seed_everything

    cfg = load_config(args.config, args.set)
    seed_everything(args.seed)
    data, task, optim_cfg, tokenizer = build(cfg)
    init = cfg.get("run", {}).get("init_from")
    if init and not args.no_init:
        report = load_init_weights(task, init)
        if args.fresh_head:
            fresh = type(task)(task.model, task.cfg, tokenizer, tie_mlm_head=task.tie_mlm_head).heads.state_dict()
            task.heads.load_state_dict(fresh)
        print(f"init_from {init}: loaded {report['loaded']}, new {report['missing']}, fresh_head={args.fresh_head}")
    task.to(args.device)
    seed_everything(args.seed + 1)
    train_set = next(iter(task.build_datasets(data, tokenizer, "train").values()))
    eval_set = next(iter(task.build_datasets(data, tokenizer, args.eval_split).values()))
    if args.video_probe:
        task = VideoProbe(task, train_set, args.video_probe == "frozen", args.probe_pool,
                          data.num_frames, data.image_size).to(args.device)
    decay = [p for n, p in task.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in task.named_parameters() if p.requires_grad and p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": optim_cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=optim_cfg.lr,
                                  betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    warmup = optim_cfg.warmup_steps if optim_cfg.warmup_steps is not None else int(optim_cfg.warmup_ratio * args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    backbone = [p for p in task.model.parameters() if p.requires_grad]
    if args.video_probe:
        args.probe_every = 10 ** 9
    generator = torch.Generator().manual_seed(args.seed)
    print(f"train {len(train_set)}  {args.eval_split} {len(eval_set)}  chance ln K = {math.log(cfg['task'].get('num_options', 5)):.4f}")
    task.train()
    step, reached, started, losses = 0, None, time.time(), []
    results = {0: evaluate(task, eval_set, data.eval_batch_size or data.batch_size)}
    print(f"step     0 {args.eval_split} acc {results[0]:.1f}", flush=True)
    while step < args.steps:
        for batch in batches(train_set, data.batch_size, generator, shuffle=True):
            out = task(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if step < args.freeze_backbone_steps:
                for p in backbone:
                    p.grad = None
            grads = [p.grad.norm() for p in backbone if p.grad is not None]
            backbone_norm = torch.norm(torch.stack(grads)).item() if grads else 0.0
            norm = torch.nn.utils.clip_grad_norm_(task.parameters(), optim_cfg.grad_clip).item()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(out["loss"].item())
            if step % args.probe_every == 0 or (step == 1 and not args.video_probe):
                stats = probe(task, batch)
                print(f"step {step:5d} loss {sum(losses) / len(losses):.4f} grad {norm:.4f} backbone_grad {backbone_norm:.4f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in stats.items()) + f" lr {schedule.get_last_lr()[0]:.2e}"
                      + f" {time.time() - started:.0f}s", flush=True)
                losses = []
            if step % args.eval_every == 0 or step == args.steps:
                acc = evaluate(task, eval_set, data.eval_batch_size or data.batch_size)
                results[step] = acc
                if reached is None and acc >= args.target:
                    reached = step
                print(f"step {step:5d} {args.eval_split} acc {acc:.1f}", flush=True)
            if step >= args.steps:
                break
    test_acc = None
    if args.test and not args.video_probe:
        test_set = next(iter(task.build_datasets(data, tokenizer, "test").values()))
        test_acc = evaluate(task, test_set, data.eval_batch_size or data.batch_size)
    print("RESULT " + json.dumps({"final_acc": results.get(step), "test_acc": test_acc, "steps_to_target": reached,
                                  "curve": results,
                                  "wall_s": round(time.time() - started), "sets": args.set,
                                  "fresh_head": args.fresh_head, "seed": args.seed}))


if __name__ == "__main__":
    main()
