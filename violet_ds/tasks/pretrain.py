"""VIOLET / VIOLETv2 / LAVENDER pretraining: video-text matching, masked language and visual modeling.

Objectives (docs/reference.md#2-pretraining-objectives), each weighted by `task.loss_weights` (a weight of 0 or a missing key turns
the objective off and builds no head for it):

- `vtm`: every video is paired with its own text and `min(B, vtm_negatives + 1) - 1` other texts of
  the batch. `head_style: head` (VIOLET/VIOLETv2): the score head on the pooled output gives
  `(B, 1 + negatives)` logits / `vtm_temperature`, cross-entropy with the positive at column 0.
  `head_style: mlm` (LAVENDER): `[CLS] text [SEP] [MASK] [SEP]` and the MLM head must say "true" for
  the matching pair and "false" for the others (cross-entropy over the vocabulary at [MASK]); a pair's
  score is the softmax over {true, false} at [MASK]. `vtm_listwise` > 0 adds `loss_vtm_listwise`, a
  cross-entropy over each video's candidates' true/false log-odds / `vtm_temperature` (own text first),
  times that weight: the contrast between candidates that head style has, which shortens the plateau
  a from-scratch model sits on before matching takes off.
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
from violet_ds.engine.evaluator import gather_outputs
from violet_ds.masking.text import IGNORE_INDEX, mask_text
from violet_ds.masking.visual import apply_video_mask, mask_video_tokens, needs_attention, video_attention_grid
from violet_ds.models.heads import MVMHead, head_dropout
from violet_ds.registry import TASKS
from violet_ds.targets import create_targets
from violet_ds.tasks.common import VideoTextTask, chance_loss, cross_entropy_or_zero, task_embedding_head


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
        if cfg.vtm_listwise < 0 or (cfg.vtm_listwise and not self.lavender):
            raise ValueError(f"task pretrain: vtm_listwise ({cfg.vtm_listwise}) is a weight >= 0 for head_style mlm "
                             f"(head style's VTM is already a softmax over the candidates)")
        if cfg.mlm_start_step < 0:
            raise ValueError(f"task pretrain: mlm_start_step must be >= 0, got {cfg.mlm_start_step}")
        self.step = 0
        self.special_ids = tokenizer.special_ids
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, the model's text "
                             f"vocabulary only {model.vocab_size}: set model.overrides.vocab_size")
        self.patch = model.video_patch_stride

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
    # Each objective is (inputs of its cross-modal pass, loss from that pass's hidden states). `_losses` draws
    # every random choice first (in-batch negatives, text masking, video masking: the order of the draws is
    # fixed), encodes the clean and the masked clips in one backbone call, and runs the VIOLET-style pairs of
    # all objectives through the cross-modal encoder together: rows do not interact, so this equals one pass
    # per objective to float rounding, with one backbone call instead of two and one cross-modal call instead of
    # three (fewer, larger kernels: the GPU step was launch-bound at batch 16) and one word-table gradient.
    batch_passes = True  # False: one backbone / cross-modal call per clip / objective (the reference in tests)

    def _vtm_columns(self, batch_size: int, device) -> torch.Tensor:
        """`(B, 1 + k)` text rows paired with each video: its own text first, then the in-batch negatives."""
        negatives = self._negatives(batch_size, device)
        return torch.cat([torch.arange(batch_size, device=device)[:, None], negatives], dim=1)

    def _vtm_head_loss(self, pooled: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) from the pooled outputs of the `B * (1 + k)` pairs, positive at column 0."""
        scores = self.heads["score"](pooled).float().view(batch_size, -1)
        logits = scores / self.cfg.vtm_temperature
        loss = F.cross_entropy(logits, torch.zeros(batch_size, dtype=torch.long, device=logits.device))
        return loss, (logits.argmax(dim=1) == 0).float().mean()

    def _vtm_lavender(self, video_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                      columns: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """LAVENDER VTM: its own pass, the pair text ends in `[SEP] [MASK] [SEP]` (true/false at [MASK]).
        Returns (true/false loss, accuracy, listwise loss or None when `vtm_listwise` is 0)."""
        batch_size, per_video = columns.shape
        pair_video = video_tokens.repeat_interleave(per_video, dim=0)
        flat = columns.flatten()
        is_match = (torch.arange(per_video, device=columns.device) == 0).repeat(batch_size)
        loss, odds = self.match_mlm_loss(pair_video, None, text_ids[flat], text_mask[flat], is_match)
        odds = odds.view(batch_size, per_video)
        listwise = None
        if self.cfg.vtm_listwise and per_video > 1:
            target = torch.zeros(batch_size, dtype=torch.long, device=odds.device)
            listwise = F.cross_entropy(odds / self.cfg.vtm_temperature, target)
        return loss, (odds.argmax(dim=1) == 0).float().mean(), listwise

    def _mlm_head_loss(self, text_hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy over the masked tokens) from the text part of the MLM pass."""
        # every text position goes through the head (about 0.3% of a violet-v2 step's FLOPs) rather than only the
        # masked ones: selecting them is a host sync per step. A batch with nothing masked gives a zero loss that
        # keeps the graph (every rank must run the same backward)
        labels = labels.reshape(-1)
        logits = self.heads["mlm"](text_hidden).float().flatten(0, -2)
        chosen = labels != IGNORE_INDEX
        hits = (logits.argmax(dim=1) == labels) & chosen
        return cross_entropy_or_zero(logits, labels), hits.sum() / chosen.sum().clamp(min=1)

    def _mvm_heads(self, video_hidden: torch.Tensor, grid: Tuple[int, int, int]) -> Dict[str, torch.Tensor]:
        """Each target's head output from the cross-modal hidden states at the video patch tokens."""
        frames, h, w = grid
        patches = video_hidden.reshape(video_hidden.shape[0], frames, 1 + h * w, -1)[:, :, 1:]
        patches = patches.reshape(video_hidden.shape[0], frames, h, w, -1)
        return {name: self.heads[head](patches) for name, head in self.mvm_head_names.items()}

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

    def mvm_predictions(self, masked_video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
                        ) -> Dict[str, torch.Tensor]:
        """Each target's head output for a masked clip (its own backbone and cross-modal pass)."""
        video_tokens = self.model.encode_video(masked_video.to(self._param().dtype))
        grid = self.model.video_token_grid(masked_video.shape[1], *masked_video.shape[-2:])
        hidden = self._fuse(video_tokens, text_ids, text_mask)[:, : video_tokens.shape[1]]
        return self._mvm_heads(hidden, grid)

    # ------------------------------------------------------------------ task API
    def _encode_clips(self, clips: List[torch.Tensor]) -> List[torch.Tensor]:
        """Video tokens of each clip batch, from one backbone call over all of them when `batch_passes`."""
        dtype = self._param().dtype
        if not self.batch_passes or len(clips) == 1:
            return [self.model.encode_video(clip.to(dtype)) for clip in clips]
        tokens = self.model.encode_video(torch.cat(clips).to(dtype))
        return list(tokens.split([clip.shape[0] for clip in clips]))

    def _fuse_pairs(self, pairs: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> List[torch.Tensor]:
        """Cross-modal hidden states of each (video tokens, text ids, text mask) group: one word-table lookup
        and, when `batch_passes`, one encoder call over all groups (they share the token and text lengths)."""
        if not pairs:
            return []
        sizes = [ids.shape[0] for _, ids, _ in pairs]
        all_ids = torch.cat([ids for _, ids, _ in pairs])
        words = self.model.word_embeddings(all_ids)
        if not self.batch_passes:
            return [self._fuse(video, ids, mask, words=part)
                    for (video, ids, mask), part in zip(pairs, words.split(sizes))]
        hidden = self._fuse(torch.cat([video for video, _, _ in pairs]), all_ids,
                            torch.cat([mask for _, _, mask in pairs]), words=words)
        return list(hidden.split(sizes))

    def _losses(self, batch: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        video = self._video(batch)
        device = video.device
        text_ids = batch["text_ids"].to(device)
        text_mask = batch["text_mask"].to(device)
        batch_size = video.shape[0]
        w = self.weights
        # 1. every random draw, in a fixed order
        columns = self._vtm_columns(batch_size, device) if w["vtm"] else None
        if w["mlm"]:
            masked_ids, labels = mask_text(text_ids, text_mask, mask_id=self.special.mask,
                                           special_ids=self.special_ids, vocab_size=self.tokenizer.vocab_size,
                                           probability=self.cfg.mlm_probability, mode=self.cfg.mlm_replace)
        extras: Dict[str, Any] = {}
        if w["mvm"]:
            masked_video, token_mask, grid = self.mask_video(video, text_ids, text_mask)
            targets = self.targets.compute(video, batch)
        # 2. the backbone: clean clip (VTM, MLM) and masked clip (MVM)
        clips = ([video] if (w["vtm"] or w["mlm"]) else []) + ([masked_video] if w["mvm"] else [])
        encoded = self._encode_clips(clips)
        clean = encoded[0] if (w["vtm"] or w["mlm"]) else None
        # 3. the cross-modal passes
        pairs, names = [], []
        if w["vtm"] and not self.lavender:
            flat = columns.flatten()
            pairs.append((clean.repeat_interleave(columns.shape[1], dim=0), text_ids[flat], text_mask[flat]))
            names.append("vtm")
        if w["mlm"]:
            pairs.append((clean, masked_ids, text_mask))
            names.append("mlm")
        if w["mvm"]:
            pairs.append((encoded[-1], text_ids, text_mask))
            names.append("mvm")
        hidden = dict(zip(names, self._fuse_pairs(pairs)))
        # 4. the losses
        out: Dict[str, torch.Tensor] = {}
        terms = []
        if w["vtm"]:
            listwise = None
            if self.lavender:
                loss, accuracy, listwise = self._vtm_lavender(clean, text_ids, text_mask, columns)
            else:
                loss, accuracy = self._vtm_head_loss(hidden["vtm"][:, clean.shape[1]], batch_size)
            out["loss_vtm"], out["acc_vtm"] = loss, accuracy.detach()
            terms.append(loss * w["vtm"])
            if listwise is not None:
                out["loss_vtm_listwise"] = listwise
                terms.append(listwise * (w["vtm"] * self.cfg.vtm_listwise))
        if w["mlm"]:
            loss, accuracy = self._mlm_head_loss(hidden["mlm"][:, clean.shape[1]:], labels)
            out["loss_mlm"], out["acc_mlm"] = loss, accuracy.detach()
            # before mlm_start_step (training only) MLM keeps its graph with weight 0: every rank runs one backward
            waiting = self.training and self.step < self.cfg.mlm_start_step
            terms.append(loss * (0.0 if waiting else w["mlm"]))
        if w["mvm"]:
            video_tokens = encoded[-1].shape[1]
            preds = self._mvm_heads(hidden["mvm"][:, :video_tokens], grid)
            loss, parts = self.targets.loss(preds, targets, token_mask)
            out["loss_mvm"] = loss
            if len(parts) > 1:
                out.update({f"loss_mvm_{name}": part.detach() for name, part in parts.items()})
            terms.append(loss * w["mvm"])
            extras = {"masked_video": masked_video, "token_mask": token_mask, "preds": preds, "targets": targets}
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        out["loss"] = total
        return out, extras

    def set_step(self, step: int) -> None:
        self.step = step

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
