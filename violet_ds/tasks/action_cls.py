"""Action classification on a VIOLET backbone (VIMPAC-style datasets as a VIOLET task).

Batches carry `video` and `label` (class index). The cross-modal transformer gets the video and a
fixed text prompt (`options.prompt`, empty by default: `[CLS] [SEP]`).
- head_style "head": `heads.classifier` (linear, zero-initialised with `zero_init: true` as VIMPAC
  fine-tuning does) on the pooled output (text [CLS]) or on the mean of the video tokens (`pool`).
- head_style "mlm": LAVENDER-style: `[CLS] prompt [SEP] [MASK] [SEP]`, the MLM head at [MASK] is
  trained towards the class word and prediction is the best class word. Each class needs one word
  piece: `options.class_words`, or else a distinct single-piece word picked from each label name
  (last word first), an error naming the label when there is none.
Multi-view testing: `video (B, views, T, 3, H, W)` averages the video encoder outputs over views.

The class list comes from `options.labels` (annotation JSON with a top-level "labels" list, or the
list itself); `task.num_classes` alone is enough for the head style.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from violet_ds.data.annotations import load_word_list
from violet_ds.data.datasets import ActionDataset
from violet_ds.metrics import accuracy, topk_accuracy
from violet_ds.models.heads import Classifier
from violet_ds.registry import TASKS
from violet_ds.tasks.common import (DownstreamTask, append_answer_mask, encode_video, fuse_pairs, gather_positions,
                                    gather_step_outputs, pooled_of)


def pick_class_words(labels: List[str], tokenizer) -> List[str]:
    """One distinct single-word-piece word per label (its last word first, then the others)."""
    chosen: List[str] = []
    for label in labels:
        words = [w for w in label.lower().replace("_", " ").split() if w]
        pick = next((w for w in reversed(words) if tokenizer.token_id(w) >= 0 and w not in chosen), None)
        if pick is None:
            raise ValueError(f"action_cls (head_style mlm): label {label!r} has no word that is a single word piece "
                             "and not already used by another label; set task.options.class_words")
        chosen.append(pick)
    return chosen


@TASKS.register("action_cls")
class ActionClassification(DownstreamTask):
    """Video classification over a fixed label set."""

    option_defaults: Dict[str, Any] = {
        "labels": None,        # annotation JSON with "labels", or the list of class names
        "class_words": None,   # mlm: one word per class (default: picked from the label names)
        "prompt": "",          # text fed with the video
        "pool": "text_cls",    # head: text_cls (pooled output) or video_mean
        "zero_init": False,    # head: zero-initialised classifier (VIMPAC fine-tuning)
        "label_smoothing": 0.0,
    }
    dataset_class = ActionDataset

    def build(self) -> None:
        super().build()
        cfg, tokenizer = self.cfg, self.tokenizer
        self.labels = load_word_list(self.options["labels"], "labels", "task.options.labels", nonempty=True)
        num_classes = len(self.labels) if self.labels is not None else cfg.num_classes
        if num_classes <= 0:
            raise ValueError(f"task {cfg.name!r}: set task.options.labels (annotation JSON with 'labels') or "
                             "task.num_classes")
        if self.labels is not None and cfg.num_classes and cfg.num_classes != num_classes:
            raise ValueError(f"task {cfg.name!r}: task.num_classes={cfg.num_classes} but options.labels has "
                             f"{num_classes} classes")
        if self.options["pool"] not in ("text_cls", "video_mean"):
            raise ValueError(f"task {cfg.name!r}: options.pool must be text_cls or video_mean")
        self.num_classes = num_classes
        prompt_ids, prompt_mask = tokenizer.encode([self.options["prompt"]], max(4, len(tokenizer.tokenize(
            self.options["prompt"])) + 4))
        if self.head_style == "mlm":
            if self.labels is None and self.options["class_words"] is None:
                raise ValueError(f"task {cfg.name!r}: head_style mlm needs options.labels or options.class_words")
            words = self.options["class_words"] or pick_class_words(self.labels, tokenizer)
            if len(words) != num_classes:
                raise ValueError(f"task {cfg.name!r}: {len(words)} class_words for {num_classes} classes")
            token_ids = [tokenizer.token_id(w) for w in words]
            bad = [w for w, t in zip(words, token_ids) if t < 0]
            if bad or len(set(token_ids)) != len(token_ids):
                raise ValueError(f"task {cfg.name!r}: class words must be distinct single word pieces; bad: "
                                 f"{bad or words}")
            self.class_words = list(words)
            self.register_buffer("class_token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
            prompt_ids, prompt_mask, _ = append_answer_mask(prompt_ids, prompt_mask, self.special)
            self.heads["mlm"] = self._mlm_head()
        else:
            self.heads["classifier"] = Classifier(self.model.hidden_size, num_classes,
                                                  zero_init=bool(self.options["zero_init"]))
        self.register_buffer("prompt_ids", prompt_ids[0], persistent=False)
        self.register_buffer("prompt_mask", prompt_mask[0], persistent=False)

    def portable_options(self) -> Dict[str, Any]:
        options = super().portable_options()
        if isinstance(options.get("labels"), str):
            options["labels"] = list(self.labels)
        return options

    def scores(self, video: torch.Tensor):
        """(class logits `(B, C)`, MLM logits over the whole text vocabulary `(B, V)` or None)."""
        video_tokens, video_mask = encode_video(self.model, video)
        batch = video_tokens.shape[0]
        ids = self.prompt_ids[None].expand(batch, -1)
        mask = self.prompt_mask[None].expand(batch, -1)
        hidden = fuse_pairs(self.model, video_tokens, video_mask, ids, mask)
        num_video = video_tokens.shape[1]
        if self.head_style == "mlm":
            position = (mask.sum(dim=1) - 2) + num_video  # the [MASK] before the final [SEP]
            vocab_logits = self.heads["mlm"](gather_positions(hidden, position)).float()
            return vocab_logits.index_select(1, self.class_token_ids), vocab_logits
        if self.options["pool"] == "video_mean":
            features = hidden[:, :num_video].mean(dim=1)
        else:
            features = pooled_of(hidden, num_video)
        return self.heads["classifier"](features).float(), None

    def logits(self, video: torch.Tensor) -> torch.Tensor:
        """Class logits `(B, C)`."""
        return self.scores(video)[0]

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        logits, vocab_logits = self.scores(batch["video"])
        label = batch["label"].to(logits.device).long()
        smoothing = float(self.options["label_smoothing"])
        if vocab_logits is not None:
            # LAVENDER trains the answer word against the whole text vocabulary
            loss = F.cross_entropy(vocab_logits, self.class_token_ids[label], label_smoothing=smoothing)
        else:
            loss = F.cross_entropy(logits, label, label_smoothing=smoothing)
        acc = (logits.argmax(dim=1) == label).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    @torch.no_grad()
    def evaluate_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        logits = self.logits(batch["video"])
        return {"index": batch["index"].cpu(), "logits": logits.cpu(), "label": batch["label"].cpu(),
                "video_id": list(batch.get("video_id", [""] * len(logits)))}

    def evaluate_end(self, outputs: List[Dict[str, Any]], world) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        logits, labels = merged["logits"], merged["label"]
        pred = logits.argmax(dim=1)
        name = (lambda i: self.labels[i] if self.labels is not None else str(i))
        self.last_predictions = [{"index": int(i), "video": v, "pred": name(int(p)), "label": name(int(t))}
                                 for i, v, p, t in zip(merged["index"].tolist(), merged["video_id"],
                                                       pred.tolist(), labels.tolist())]
        return {"acc": 100.0 * accuracy(pred, labels), "top5": 100.0 * topk_accuracy(logits, labels, 5),
                "num_samples": float(len(labels))}
