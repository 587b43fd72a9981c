"""Multiple-choice video QA: TGIF-Action / TGIF-Transition (question + option) and MSRVTT-MC / LSMDC-MC
(one caption per option, scored like retrieval).

Batches carry `option_ids` / `option_mask` `(B, K, L)` (each option's full text, e.g. the question
paired with the option) and `answer` `(B,)`. The video is encoded once and paired with each of its K
options through the cross-modal transformer.
- head_style "head": `heads.score` on the pooled output of each pair -> `(B, K)` logits, cross-entropy
  over the options (VIOLET).
- head_style "mlm": `[CLS] option text [SEP] [MASK] [SEP]`; the MLM head at [MASK] is trained towards
  "true" for the correct option and "false" for the others; prediction = the option with the highest
  p(true) under the softmax over {true, false} (LAVENDER).

`options.video_answer_loss` > 0 adds, in training, a cross-entropy that names the right answer from the video
alone: the video is fused with an empty text (`[CLS] [SEP]`), a linear layer (`heads.video_answer`) reads the
pooled output, and each answer text is one class (the dataset's `answer_key`, a hash of the text, modulo
`options.answer_buckets`). Not part of VIOLET. It asks the video path directly for what the answers differ in:
when that is the order of two events, the option scores alone stay at chance for thousands of steps at the
demo's scale, while a model whose pooled output already tells the orders apart reaches 95% val in 1500 steps
(docs/results.md#temporal-order). Prediction never uses it.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from violet_ds.data.datasets import MCQADataset
from violet_ds.metrics import accuracy
from violet_ds.registry import TASKS
from violet_ds.tasks.common import (DownstreamTask, chance_loss, encode_video, fuse_pairs, gather_step_outputs,
                                    pooled_of, repeat_rows)


@TASKS.register("qa_mc")
class MultipleChoiceQA(DownstreamTask):
    """Multiple-choice QA over K options per video."""

    task_token_name = "mc"

    option_defaults: Dict[str, Any] = {
        "temperature": 1.0,  # divides option logits before the cross-entropy (head style)
        # mlm style: weight of an extra cross-entropy over the K options' true/false log-odds (0 = LAVENDER's
        # loss alone: per-option "true"/"false" at [MASK]). The listwise term contrasts the options of one
        # video directly, as the head style does; from-scratch models learn much faster with it
        "mlm_listwise": 0.0,
        # weight of the video-only answer cross-entropy (0 = off, VIOLET / LAVENDER); see the module docstring
        "video_answer_loss": 0.0,
        # classes of that cross-entropy: answer texts are hashed into this many (two answers may share one)
        "answer_buckets": 1024,
    }

    dataset_class = MCQADataset

    def build(self) -> None:
        super().build()
        self._add_match_head()
        self.video_answer_weight = float(self.options["video_answer_loss"])
        buckets = int(self.options["answer_buckets"])
        if self.video_answer_weight < 0 or buckets < 2:
            raise ValueError(f"qa_mc: task.options.video_answer_loss must be >= 0 and answer_buckets >= 2, got "
                             f"{self.video_answer_weight} and {buckets}")
        if self.video_answer_weight:
            # a linear layer at PyTorch's default init, not a ScoreHead: a zero last layer gives the pooled output no
            # gradient until the head has grown, and the read-out then sits at the answer prior for thousands of steps
            self.heads["video_answer"] = nn.Linear(self.model.hidden_size, buckets)
            empty = torch.tensor([self.special.cls, self.special.sep])
            self.register_buffer("empty_text", empty, persistent=False)  # moves with the task: no copy per step

    def chance_losses(self) -> Dict[str, float]:
        """Option loss of scores collapsed to one constant (the trainer's stall detector watches it)."""
        k = int(self.cfg.num_options)
        name = "loss_options" if self.video_answer_weight else "loss"
        if self.head_style == "mlm":
            return {name: chance_loss(k, true_false=True) + self.options["mlm_listwise"] * chance_loss(k)}
        return {name: chance_loss(k)}

    def video_answer_loss(self, video_tokens: torch.Tensor, video_mask: torch.Tensor,
                          answer_key: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of `heads.video_answer` on the video fused with an empty text against the answer's class."""
        empty = self.empty_text.expand(video_tokens.shape[0], -1)
        hidden = fuse_pairs(self.model, video_tokens, video_mask, empty, torch.ones_like(empty), self.task_vector())
        logits = self.heads["video_answer"](pooled_of(hidden, video_tokens.shape[1])).float()
        return F.cross_entropy(logits, answer_key.to(logits.device) % logits.shape[1])

    def option_logits(self, batch: Dict[str, Any], encoded: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K) option scores and, for the MLM style in training, the MLM loss. `encoded`: the batch's
        `encode_video` output when the caller has it."""
        option_ids, option_mask = batch["option_ids"], batch["option_mask"]
        if option_ids.dim() != 3:
            raise ValueError(f"qa_mc: option_ids must be (B, K, L), got {tuple(option_ids.shape)}")
        batch_size, num_options, _ = option_ids.shape
        video_tokens, video_mask = encoded or encode_video(self.model, batch["video"])
        device = video_tokens.device
        video_tokens = repeat_rows(video_tokens, num_options)
        video_mask = repeat_rows(video_mask, num_options)
        ids = option_ids.to(device).flatten(0, 1)
        mask = option_mask.to(device).flatten(0, 1)
        if self.head_style == "mlm" and self.training:
            answer = batch["answer"].to(device)
            is_match = F.one_hot(answer.clamp(min=0), num_options).flatten() * (answer >= 0).long().repeat_interleave(num_options)
            loss, scores = self.match_mlm_loss(video_tokens, video_mask, ids, mask, is_match)
            scores = scores.view(batch_size, num_options)
            if self.options["mlm_listwise"]:
                loss = loss + self.options["mlm_listwise"] * F.cross_entropy(scores, answer, ignore_index=-1)
            return scores, loss
        scores = self.match_scores(video_tokens, video_mask, ids, mask)
        return scores.view(batch_size, num_options), None

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        encoded = encode_video(self.model, batch["video"])
        logits, loss = self.option_logits(batch, encoded)
        answer = batch["answer"].to(logits.device)
        if loss is None:
            loss = F.cross_entropy(logits / self.options["temperature"], answer, ignore_index=-1)
        acc = ((logits.argmax(dim=1) == answer) & (answer >= 0)).float().mean()
        if not self.video_answer_weight:
            return {"loss": loss, "acc": acc.detach()}
        if "answer_key" not in batch:
            raise KeyError("qa_mc: task.options.video_answer_loss needs the batch's `answer_key` (MCQADataset gives it)")
        video_answer = self.video_answer_loss(*encoded, batch["answer_key"])
        return {"loss": loss + self.video_answer_weight * video_answer, "loss_options": loss.detach(),
                "loss_video_answer": video_answer.detach(), "acc": acc.detach()}

    @torch.no_grad()
    def evaluate_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        logits, _ = self.option_logits(batch)
        return {"index": batch["index"].cpu(), "pred": logits.argmax(dim=1).cpu(), "answer": batch["answer"].cpu(),
                "scores": logits.float().cpu(), "video_id": list(batch.get("video_id", [""] * len(logits)))}

    def evaluate_end(self, outputs: List[Dict[str, Any]], world) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        self.last_predictions = [
            {"index": int(i), "video": v, "pred": int(p), "answer": int(a)}
            for i, v, p, a in zip(merged["index"].tolist(), merged["video_id"], merged["pred"].tolist(),
                                  merged["answer"].tolist())]
        return {"acc": 100.0 * accuracy(merged["pred"], merged["answer"]), "num_samples": float(len(merged["pred"]))}
