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
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from violet_ds.data.datasets import MCQADataset
from violet_ds.metrics import accuracy
from violet_ds.registry import TASKS
from violet_ds.tasks.common import DownstreamTask, chance_loss, encode_video, gather_step_outputs, repeat_rows


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
    }

    dataset_class = MCQADataset

    def build(self) -> None:
        super().build()
        self._add_match_head()

    def chance_losses(self) -> Dict[str, float]:
        """Training loss of scores collapsed to one constant (the trainer's stall detector watches it)."""
        k = int(self.cfg.num_options)
        if self.head_style == "mlm":
            return {"loss": chance_loss(k, true_false=True) + self.options["mlm_listwise"] * chance_loss(k)}
        return {"loss": chance_loss(k)}

    def option_logits(self, batch: Dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K) option scores and, for the MLM style in training, the MLM loss."""
        option_ids, option_mask = batch["option_ids"], batch["option_mask"]
        if option_ids.dim() != 3:
            raise ValueError(f"qa_mc: option_ids must be (B, K, L), got {tuple(option_ids.shape)}")
        batch_size, num_options, _ = option_ids.shape
        video_tokens, video_mask = encode_video(self.model, batch["video"])
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
        logits, loss = self.option_logits(batch)
        answer = batch["answer"].to(logits.device)
        if loss is None:
            loss = F.cross_entropy(logits / self.options["temperature"], answer, ignore_index=-1)
        acc = ((logits.argmax(dim=1) == answer) & (answer >= 0)).float().mean()
        return {"loss": loss, "acc": acc.detach()}

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
