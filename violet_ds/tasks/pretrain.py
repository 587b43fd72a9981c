"""VIOLET / VIOLETv2 / LAVENDER pretraining: video-text matching, masked language and visual modeling.

Objectives (REFERENCE §2), each weighted by `task.loss_weights` (a weight of 0 or a missing key turns
the objective off and builds no head for it):

- `vtm`: every video is paired with its own text and `min(B, vtm_negatives + 1) - 1` other texts of
  the batch. `head_style: head` (VIOLET/VIOLETv2): the score head on the pooled output gives
  `(B, 1 + negatives)` logits / `vtm_temperature`, cross-entropy with the positive at column 0.
  `head_style: mlm` (LAVENDER): `[CLS] text [SEP] [MASK] [SEP]` and the MLM head must say "true" for
  the matching pair and "false" for the others (cross-entropy over the vocabulary at [MASK]); a pair's
  score is the softmax over {true, false} at [MASK].
- `mlm`: mask `mlm_probability` of the non-special text tokens (`mlm_replace`: mask / bert) and
  predict them with the video unmasked.
- `mvm`: hide `mvm_ratio` of the video tokens (one of `mvm_strategies` per sample: rm / bm / am)
  by zeroing their pixels, and predict each configured target (`mvm_targets`: name -> weight) at the
  masked positions from the cross-modal outputs at the video patch tokens (never the frame [CLS]).
  Targets come from `violet_ds.targets`; `vq` may come pre-extracted from the batch (`vq_tokens`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from violet_ds.data.datasets import PretrainDataset
from violet_ds.data.frames import denormalize, normalize
from violet_ds.masking.text import IGNORE_INDEX, mask_text
from violet_ds.masking.visual import (apply_video_mask, mask_video_tokens, needs_attention,
                                      video_attention_grid)
from violet_ds.registry import TASKS
from violet_ds.tasks.common import VideoTextTask, chance_loss, task_embedding_head

OBJECTIVES = ("vtm", "mlm", "mvm")


def _check_known(kind: str, given, known) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"task pretrain: unknown {kind} {unknown}; known: {sorted(known)}")


def _frames_strip(video: torch.Tensor) -> torch.Tensor:
    """`(T, 3, H, W)` float in [0, 1] -> one image `(3, H, T*W)` with the frames side by side."""
    return video.permute(1, 2, 0, 3).reshape(video.shape[1], video.shape[2], -1)


def _to_gray_image(value: torch.Tensor) -> torch.Tensor:
    """`(T, C, H, W)` of any range -> `(T, 3, H, W)` in [0, 1] (channel mean, min-max scaled)."""
    gray = value.float().mean(dim=1, keepdim=True)
    low, high = gray.amin(), gray.amax()
    return ((gray - low) / (high - low).clamp(min=1e-6)).expand(-1, 3, -1, -1)


@TASKS.register("pretrain")
class PretrainTask(VideoTextTask):
    """VTM + MLM + MVM over a VIOLET backbone; heads in `self.heads` (`score`, `mlm`, `mvm`, `mvm_<target>`)."""

    # LAVENDER's VTM pairs carry the "vtm" row of the task embedding when task.task_token is on
    task_token_name = "vtm"
    # caption datasets (image-text rows repeat to num_frames); a source's `vq` tokens come along
    dataset_class = PretrainDataset

    def build(self) -> None:
        cfg, model, tokenizer = self.cfg, self.model, self.tokenizer
        _check_known("loss_weights keys", cfg.loss_weights, OBJECTIVES)
        if cfg.options:
            raise ValueError(f"task pretrain takes no task.options, got {sorted(cfg.options)}")
        super().build()
        self.weights = {name: float(cfg.loss_weights.get(name, 0.0)) for name in OBJECTIVES}
        if not any(self.weights.values()):
            raise ValueError("task pretrain: every loss weight is 0, nothing to train")
        if cfg.vtm_temperature <= 0:
            raise ValueError(f"task pretrain: vtm_temperature must be > 0, got {cfg.vtm_temperature}")
        self.lavender = self.head_style == "mlm"
        self.special_ids = tokenizer.special_ids
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, the model's text "
                             f"vocabulary only {model.vocab_size}: set model.overrides.vocab_size")
        self.patch = int(getattr(getattr(getattr(model, "video_backbone", None), "cfg", None), "stride", 32))

        from violet_ds.models.heads import MVMHead, head_dropout

        if self.weights["mlm"] or (self.weights["vtm"] and self.lavender):
            self.heads["mlm"] = self._mlm_head()
        if self.weights["vtm"] and not self.lavender:
            self.heads["score"] = self._score_head(1)
        if self.lavender and self.weights["vtm"]:
            self.true_id, self.false_id = self._true_false_ids()
        if self.lavender:
            # LAVENDER's `emb_task` (MLM never carries a task token)
            self.heads["task_embedding"] = task_embedding_head(model, self.task_token and bool(self.weights["vtm"]))
        self.targets = None
        self.mvm_head_names: Dict[str, str] = {}
        if self.weights["mvm"]:
            _check_known("mvm_strategies", cfg.mvm_strategies, ("rm", "bm", "am"))
            if not cfg.mvm_strategies:
                raise ValueError("task pretrain: mvm_strategies is empty")
            _check_known("target_options keys", cfg.target_options, cfg.mvm_targets)
            from violet_ds.targets import create_targets

            # a plain attribute: teachers inside targets never become submodules (optimizer, checkpoints)
            self.targets = create_targets(cfg.mvm_targets, cfg.target_options, patch=self.patch)
            if not len(self.targets):
                raise ValueError("task pretrain: mvm weight > 0 but no MVM target has a weight > 0")
            for number, entry in enumerate(self.targets):
                head_name = "mvm" if number == 0 else f"mvm_{entry.name}"
                spec = entry.target.spec
                self.heads[head_name] = MVMHead(model.hidden_size, spec.kind, spec.channels, patch=self.patch,
                                                 dropout=head_dropout(model))
                self.mvm_head_names[entry.name] = head_name

    def frozen_modules(self) -> List[nn.Module]:
        return self.targets.teachers() if self.targets is not None else []

    def move_teachers(self, device: torch.device, dtype: Union[str, torch.dtype, None]) -> None:
        if self.targets is not None:
            self.targets.to(device, dtype)

    # ------------------------------------------------------------------ plumbing
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def _video(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Normalised float clip on the model's device, in fp32 (targets are made from it)."""
        video = batch["video"].to(self._param().device, non_blocking=True)
        if video.dtype == torch.uint8:
            return normalize(video)
        return video.float()

    def _fuse(self, video_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
              words: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model.fuse(video_tokens, None, self.model.embed_text(text_ids, word_embeds=words), text_mask)

    def chance_losses(self) -> Dict[str, float]:
        """VTM loss of a collapsed matcher (all 1 + vtm_negatives candidates scored alike), for the stall detector."""
        if not self.weights["vtm"]:
            return {}
        return {"loss_vtm": chance_loss(self.cfg.vtm_negatives + 1, true_false=self.lavender)}

    def _negatives(self, batch_size: int, device) -> torch.Tensor:
        """`(B, k)` indices of other texts in the batch, k = min(B, negatives + 1) - 1, distinct per row."""
        count = min(batch_size, self.cfg.vtm_negatives + 1) - 1
        scores = torch.rand(batch_size, batch_size, device=device)
        scores.fill_diagonal_(-1.0)
        return scores.topk(count, dim=1).indices if count > 0 else torch.empty(batch_size, 0, dtype=torch.long,
                                                                               device=device)

    # ------------------------------------------------------------------ objectives
    def vtm(self, video_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
            words: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of matching each video against its text and in-batch negative texts
        (`words`: the word embeddings of `text_ids`, looked up by the caller; VIOLET only)."""
        batch_size, device = video_tokens.shape[0], video_tokens.device
        negatives = self._negatives(batch_size, device)
        columns = torch.cat([torch.arange(batch_size, device=device)[:, None], negatives], dim=1)  # (B, 1+k)
        per_video = columns.shape[1]
        pair_video = video_tokens.repeat_interleave(per_video, dim=0)
        pair_ids, pair_mask = text_ids[columns.flatten()], text_mask[columns.flatten()]
        if self.lavender:
            is_match = (torch.arange(per_video, device=device) == 0).repeat(batch_size)
            loss, odds = self.match_mlm_loss(pair_video, None, pair_ids, pair_mask, is_match)
            accuracy = (odds.view(batch_size, per_video).argmax(dim=1) == 0).float().mean()
            return loss, accuracy
        pair_words = None if words is None else words.index_select(0, columns.flatten())
        hidden = self._fuse(pair_video, pair_ids, pair_mask, words=pair_words)
        scores = self.heads["score"](hidden[:, pair_video.shape[1]]).float().view(batch_size, per_video)
        logits = scores / self.cfg.vtm_temperature
        loss = F.cross_entropy(logits, torch.zeros(batch_size, dtype=torch.long, device=device))
        accuracy = (logits.argmax(dim=1) == 0).float().mean()
        return loss, accuracy

    @torch.no_grad()
    def match_probability(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """P(match) of row-aligned (video, text) pairs `(B,)`: the sigmoid of `match_scores`.

        LAVENDER: the softmax over the two logits {true, false} at the appended [MASK] (not a ratio of
        raw logits as in the official code); VIOLET: sigmoid of the score head.
        """
        if video.dtype == torch.uint8:
            video = normalize(video.to(self._param().device))
        video_tokens = self.model.encode_video(video.to(self._param().dtype))
        return torch.sigmoid(self.match_scores(video_tokens, None, text_ids, text_mask))

    def mlm(self, video_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy over masked tokens) of predicting masked text with the video visible."""
        masked_ids, labels = mask_text(text_ids, text_mask, mask_id=self.special.mask, special_ids=self.special_ids,
                                       vocab_size=self.tokenizer.vocab_size, probability=self.cfg.mlm_probability,
                                       mode=self.cfg.mlm_replace)
        hidden = self._fuse(video_tokens, masked_ids, text_mask)
        text_hidden = hidden[:, video_tokens.shape[1]:]
        chosen = labels != IGNORE_INDEX
        if not bool(chosen.any()):
            # keep the graph (every rank must run the same backward) with a zero loss
            zero = self.heads["mlm"](text_hidden[:, :1]).sum() * 0.0
            return zero, torch.zeros((), device=hidden.device)
        logits = self.heads["mlm"](text_hidden[chosen]).float()
        loss = F.cross_entropy(logits, labels[chosen])
        accuracy = (logits.argmax(dim=1) == labels[chosen]).float().mean()
        return loss, accuracy

    def mask_video(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int]]:
        """(masked clip, token mask `(B, T, h, w)`, grid) with one strategy drawn per sample."""
        batch_size, frames, _, height, width = video.shape
        grid = self.model.video_token_grid(frames, height, width)
        attention = None
        if needs_attention(self.cfg.mvm_strategies):
            # an extra no-grad pass: where the model looks is what attended masking hides
            received = self.model.attention_received(video.to(self._param().dtype), text_ids, text_mask)
            attention = video_attention_grid(received, grid)
        token_mask, _ = mask_video_tokens(batch_size, grid, self.cfg.mvm_strategies, self.cfg.mvm_ratio,
                                          attention=attention, device=video.device)
        return apply_video_mask(video, token_mask), token_mask, grid

    def mvm_predictions(self, masked_video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                        words: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Each target's head output from the cross-modal hidden states at the video patch tokens."""
        video_tokens = self.model.encode_video(masked_video.to(self._param().dtype))
        frames, h, w = self.model.video_token_grid(masked_video.shape[1], *masked_video.shape[-2:])
        hidden = self._fuse(video_tokens, text_ids, text_mask, words=words)[:, : video_tokens.shape[1]]
        patches = hidden.reshape(hidden.shape[0], frames, 1 + h * w, -1)[:, :, 1:]
        patches = patches.reshape(hidden.shape[0], frames, h, w, -1)
        return {name: self.heads[head](patches) for name, head in self.mvm_head_names.items()}

    def mvm(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
            batch: Mapping[str, Any], words: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, Any]]:
        """(weighted loss, per-target losses, extras for visualisation)."""
        masked_video, token_mask, _ = self.mask_video(video, text_ids, text_mask)
        targets = self.targets.compute(video, batch)
        preds = self.mvm_predictions(masked_video, text_ids, text_mask, words=words)
        total, parts = self.targets.loss(preds, targets, token_mask)
        extras = {"masked_video": masked_video, "token_mask": token_mask, "preds": preds, "targets": targets}
        return total, parts, extras

    # ------------------------------------------------------------------ task API
    def _losses(self, batch: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        video = self._video(batch)
        device = video.device
        text_ids = batch["text_ids"].to(device)
        text_mask = batch["text_mask"].to(device)
        out: Dict[str, torch.Tensor] = {}
        total = None
        extras: Dict[str, Any] = {}
        video_tokens = None
        words = None
        if self.weights["vtm"] and self.weights["mvm"] and not self.lavender:
            # VTM's texts are rows of text_ids and MVM's are text_ids: one word-table lookup serves both,
            # so the (vocabulary x hidden) gradient of the table is built once for them, not per pass
            words = self.model.word_embeddings(text_ids)
        if self.weights["vtm"] or self.weights["mlm"]:
            video_tokens = self.model.encode_video(video.to(self._param().dtype))
        if self.weights["vtm"]:
            loss, accuracy = self.vtm(video_tokens, text_ids, text_mask, words=words)
            out["loss_vtm"], out["acc_vtm"] = loss, accuracy.detach()
            total = loss * self.weights["vtm"]
        if self.weights["mlm"]:
            loss, accuracy = self.mlm(video_tokens, text_ids, text_mask)
            out["loss_mlm"], out["acc_mlm"] = loss, accuracy.detach()
            total = loss * self.weights["mlm"] if total is None else total + loss * self.weights["mlm"]
        if self.weights["mvm"]:
            loss, parts, extras = self.mvm(video, text_ids, text_mask, batch, words=words)
            out["loss_mvm"] = loss
            if len(parts) > 1:
                out.update({f"loss_mvm_{name}": part.detach() for name, part in parts.items()})
            total = loss * self.weights["mvm"] if total is None else total + loss * self.weights["mvm"]
        out["loss"] = total
        return out, extras

    def forward(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        out, _ = self._losses(batch)
        return {key: value if key == "loss" else value.detach() for key, value in out.items()}

    @torch.no_grad()
    def evaluate_step(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        out, _ = self._losses(batch)
        size = batch["text_ids"].shape[0]
        step = {key: value.detach().float().reshape(1).cpu() for key, value in out.items()}
        step["batch_size"] = torch.tensor([size], dtype=torch.float32)
        return step

    def evaluate_end(self, outputs: List[Dict[str, Any]], world) -> Dict[str, float]:
        from violet_ds.engine.evaluator import gather_outputs

        merged = gather_outputs(outputs, world)
        sizes = merged.pop("batch_size", None)
        if sizes is None or not len(sizes):
            return {}
        return {key: float((value * sizes).sum() / sizes.sum()) for key, value in merged.items()
                if isinstance(value, torch.Tensor)}

    @torch.no_grad()
    def visualize(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """First clip of the batch as labelled panels per MVM target, frames side by side:
        `mvm_<target>/input`, `/masked_input`, and for dense targets `/target` (what MVM regresses: the
        frames for pixel, a gray min-max view otherwise), `/reconstruction` (the prediction everywhere)
        and `/reconstruction_in_holes` (the prediction pasted into the masked patches of the input)."""
        if not self.weights["mvm"]:
            return {}
        video = self._video(batch)[:1]
        text_ids, text_mask = batch["text_ids"][:1].to(video.device), batch["text_mask"][:1].to(video.device)
        masked_video, token_mask, _ = self.mask_video(video, text_ids, text_mask)
        preds = self.mvm_predictions(masked_video, text_ids, text_mask)
        targets = self.targets.compute(video, {k: (v[:1] if isinstance(v, torch.Tensor) else v)
                                               for k, v in batch.items()})
        original = denormalize(video[0]).float() / 255.0
        masked = denormalize(masked_video[0]).float() / 255.0
        images = {}
        for entry in self.targets:
            spec = entry.target.spec
            images[f"mvm_{entry.name}/input"] = _frames_strip(original)
            images[f"mvm_{entry.name}/masked_input"] = _frames_strip(masked)
            if spec.kind != "dense":
                continue
            pred = preds[entry.name][0].float()
            if entry.name == "pixel" and spec.channels == 3:
                recon = denormalize(pred).float() / 255.0
                target_image = original
            else:
                recon, target_image = _to_gray_image(pred), _to_gray_image(targets[entry.name].value[0])
            # the reconstruction pasted into the masked holes, next to the raw prediction
            pixel_mask = token_mask[0].repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2)[:, None]
            filled = torch.where(pixel_mask, recon, masked)
            images[f"mvm_{entry.name}/target"] = _frames_strip(target_image)
            images[f"mvm_{entry.name}/reconstruction"] = _frames_strip(recon)
            images[f"mvm_{entry.name}/reconstruction_in_holes"] = _frames_strip(filled)
        return images
