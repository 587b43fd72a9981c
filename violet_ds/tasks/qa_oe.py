"""Open-ended video QA with an answer vocabulary (TGIF-Frame, MSRVTT-QA, MSVD-QA) and fill-in-the-blank
(LSMDC-FiB).

Batches carry `text_ids` / `text_mask` (the question) and `answer` `(B,)`: an index into the answer
vocabulary, -1 for an item whose answer is outside it (never predictable, counted wrong: accuracy is
over the whole evaluated set).
- head_style "head": `heads.answer` (ScoreHead with one output per vocabulary answer) on the pooled
  output, cross-entropy (VIOLET).
- head_style "mlm": `[CLS] question [SEP] [MASK] [SEP]` (for fill-in-the-blank the blank itself
  becomes the [MASK]); the MLM head at [MASK] is trained towards the answer's word piece over the
  whole text vocabulary; prediction = the best-scoring answer among those vocabulary answers that are
  single word pieces (LAVENDER). Answers that are not one word piece can never be predicted.

The answer vocabulary comes from `task.options.answer_vocab`: an annotation JSON with a top-level
"vocab" list, or the list itself (`task.num_answers` alone is enough for the head style).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from violet_ds.data.annotations import load_word_list
from violet_ds.data.datasets import FiBDataset, OEQADataset
from violet_ds.masking.text import IGNORE_INDEX
from violet_ds.metrics import accuracy
from violet_ds.registry import TASKS
from violet_ds.tasks.common import (DownstreamTask, append_answer_mask, cross_entropy_or_zero,
                                    encode_video, fuse_pairs, gather_positions, gather_step_outputs, pooled_of,
                                    first_mask_position)


@TASKS.register("qa_oe")
class OpenEndedQA(DownstreamTask):
    """Open-ended QA / fill-in-the-blank over an answer vocabulary."""

    task_token_name = "oe"

    option_defaults: Dict[str, Any] = {
        "answer_vocab": None,       # annotation JSON with "vocab", or the list of answers
        "restrict_train_to_answers": False,  # mlm: cross-entropy over the answer words only
        "fill_in_blank": False,     # LSMDC-FiB: the question's blank (`_____`) becomes the answer [MASK]
    }

    def build(self) -> None:
        super().build()
        cfg, tokenizer = self.cfg, self.tokenizer
        self.vocab = load_word_list(self.options["answer_vocab"], "vocab", "task.options.answer_vocab", cfg.num_answers)
        num_answers = len(self.vocab) if self.vocab is not None else cfg.num_answers
        if num_answers <= 0:
            raise ValueError(f"task {cfg.name!r}: set task.options.answer_vocab (annotation JSON with a 'vocab' "
                             "list) or task.num_answers")
        self.num_answers = num_answers
        self.dataset_class = FiBDataset if self.options["fill_in_blank"] else OEQADataset
        if self.head_style == "mlm":
            if self.vocab is None:
                raise ValueError(f"task {cfg.name!r}: head_style mlm needs the answer words "
                                 "(task.options.answer_vocab)")
            self.heads["mlm"] = self._mlm_head()
            token_ids = torch.tensor([tokenizer.token_id(word) for word in self.vocab], dtype=torch.long)
            # answers that are not one word piece can be neither trained nor predicted at one [MASK]
            self.register_buffer("answer_token_ids", token_ids, persistent=False)
            self.single_piece_fraction = float((token_ids >= 0).float().mean())
        else:
            self.heads["answer"] = self._score_head(num_answers)

    def portable_options(self) -> Dict[str, Any]:
        options = super().portable_options()
        if isinstance(options.get("answer_vocab"), str):
            options["answer_vocab"] = list(self.vocab)
        return options

    def answer_vocab(self) -> Optional[List[str]]:
        return self.vocab

    # ------------------------------------------------------------------------------------------
    def _question_with_mask(self, text_ids: torch.Tensor, text_mask: torch.Tensor):
        """Question ids with the answer [MASK] (kept where the dataset put it at a fill-in-the-blank
        blank, else appended) and its position."""
        appended_ids, appended_mask, appended_position = append_answer_mask(text_ids, text_mask, self.special)
        blank_position, has_blank = first_mask_position(text_ids, text_mask, self.special.mask)
        rows = has_blank[:, None]
        ids = torch.where(rows, text_ids, appended_ids)
        mask = torch.where(rows, text_mask, appended_mask)
        return ids, mask, torch.where(has_blank, blank_position, appended_position)

    def answer_logits(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Logits `(B, V)`: over answer vocabulary (head) or over the text vocabulary at [MASK] (mlm)."""
        video_tokens, video_mask = encode_video(self.model, batch["video"])
        device = video_tokens.device
        text_ids, text_mask = batch["text_ids"].to(device), batch["text_mask"].to(device)
        if self.head_style == "mlm":
            text_ids, text_mask, position = self._question_with_mask(text_ids, text_mask)
        hidden = fuse_pairs(self.model, video_tokens, video_mask, text_ids, text_mask, self.task_vector())
        if self.head_style == "mlm":
            return self.heads["mlm"](gather_positions(hidden, position + video_tokens.shape[1])).float()
        return self.heads["answer"](pooled_of(hidden, video_tokens.shape[1])).float()

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Answer-vocabulary index predicted from `answer_logits`."""
        if self.head_style == "head":
            return logits.argmax(dim=1)
        valid = self.answer_token_ids >= 0
        candidate = logits.index_select(1, self.answer_token_ids.clamp(min=0))
        candidate = candidate.masked_fill(~valid[None, :], float("-inf"))
        return candidate.argmax(dim=1)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        logits = self.answer_logits(batch)
        answer = batch["answer"].to(logits.device).long()
        if self.head_style == "head":
            target = torch.where(answer >= 0, answer, torch.full_like(answer, IGNORE_INDEX))
            loss = cross_entropy_or_zero(logits, target)
        else:
            token = self.answer_token_ids[answer.clamp(min=0)]
            if "answer_token" in batch:
                # the dataset's word piece (LAVENDER's `answer_text` when the annotation has one)
                token = batch["answer_token"].to(logits.device).long()
            usable = (answer >= 0) & (token >= 0)
            if self.options["restrict_train_to_answers"]:
                candidate = logits.index_select(1, self.answer_token_ids.clamp(min=0))
                candidate = candidate.masked_fill((self.answer_token_ids < 0)[None, :], float("-inf"))
                loss = cross_entropy_or_zero(candidate, torch.where(usable, answer, torch.full_like(answer, IGNORE_INDEX)))
            else:
                loss = cross_entropy_or_zero(logits, torch.where(usable, token, torch.full_like(token, IGNORE_INDEX)))
        acc = (self.predict(logits.detach()) == answer).float().mean()
        return {"loss": loss, "acc": acc}

    @torch.no_grad()
    def evaluate_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        pred = self.predict(self.answer_logits(batch))
        return {"index": batch["index"].cpu(), "pred": pred.cpu(), "answer": batch["answer"].cpu(),
                "video_id": list(batch.get("video_id", [""] * len(pred)))}

    def evaluate_end(self, outputs: List[Dict[str, Any]], world) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        answers = merged["answer"]
        def word(i: int) -> Optional[str]:
            return self.vocab[i] if self.vocab is not None and 0 <= i < len(self.vocab) else None
        self.last_predictions = [
            {"index": int(i), "video": v, "pred": int(p), "answer": int(a), "pred_text": word(int(p)),
             "answer_text": word(int(a))}
            for i, v, p, a in zip(merged["index"].tolist(), merged["video_id"], merged["pred"].tolist(),
                                  answers.tolist())]
        return {"acc": 100.0 * accuracy(merged["pred"], answers), "num_samples": float(len(answers)),
                "unanswerable": float((answers < 0).sum())}
