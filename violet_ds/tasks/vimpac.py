"""VIMPAC tasks: pretraining (masked VQ-token prediction + contrastive clips) and action classification.

`vimpac_pretrain` (docs/reference.md#2-pretraining-objectives, §3): both clips of every video are masked (3D blocks or i.i.d.,
[PAD] never masked, masked tokens replaced by [MASK]) and go through the transformer in one batch;
the token head predicts the original codes at masked positions (cross-entropy); the contrastive head
maps each clip's [CLS] to a 256-d feature, and the symmetric InfoNCE treats the two clips of a video
as positives and every other clip of the all-gathered batch as negatives:

    loss = CE_mask + alpha * tau * (L_a + L_b)

`vimpac_action`: a zero-initialised linear classifier on [CLS]; at evaluation several views
(temporal clips x spatial crops, `vq_views (B, V, T, H, W)`) are classified and their softmax
probabilities averaged.

Batch keys: `vq_tokens` long `(B, T, H, W)`; pretraining also `vq_tokens_b` (the second clip);
finetuning `label` long `(B,)`; evaluation may carry `vq_views`; `index` long `(B,)`.
Task options (`task.options`) are listed in `PRETRAIN_OPTIONS` / `ACTION_OPTIONS`.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from violet_ds.data.datasets import MixedDataset
from violet_ds.data.vq_clips import VQActionDataset, VQPretrainDataset
from violet_ds.masking.blocks3d import mask_vq_tokens
from violet_ds.models.vimpac import VimpacClassifier, VimpacContrastiveHead, VimpacModel, VimpacTokenHead
from violet_ds.registry import TASKS
from violet_ds.tasks.base import Task
from violet_ds.tasks.common import gather_step_outputs, parse_options


log = logging.getLogger(__name__)

PRETRAIN_OPTIONS: Dict[str, Any] = {
    "masking": "block",          # "block" (VIMPAC) or "iid" (the paper's comparison)
    "mask_ratio": 0.15,          # i.i.d. probability; for blocks, the target of the automatic count
    "num_blocks": None,          # blocks per clip; None = the count whose expected ratio is mask_ratio
    "temperature": 0.2,          # tau of the InfoNCE
    "alpha": 1.0,                # weight of the contrastive term
    "contrastive": True,         # False: mask prediction only (single clip is enough)
    "contrastive_hidden": 4096,
    "contrastive_out": 256,
    "sync_batchnorm": True,      # SyncBatchNorm in the contrastive head on multi-rank CUDA runs
    "clip_frames": None,         # frames per clip; None = data.num_frames
    "frame_stride": 1,           # stored frames between clip frames
    "grid": None,                # [h, w] token crop of the stored grid (random when training); None = all
}

ACTION_OPTIONS: Dict[str, Any] = {
    "dropout": 0.0,
    "head_norm": None,           # None (paper: linear on raw [CLS]) or "batch" (see VimpacClassifier)
    "label_smoothing": 0.0,
    "eval_view_chunk": 64,       # clips per forward at evaluation (bounds activation memory)
    "eval_crops": 1,             # spatial crops per temporal clip at evaluation (3 = 3-crop testing)
    "clip_frames": None,
    "frame_stride": 1,
    "grid": None,
}


def _distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``(n, C)`` rows from every rank; the local rows keep their autograd graph.

    Returns the concatenation in rank order and the offset of this rank's rows. Ranks may hold
    different row counts (a short last batch): sizes are exchanged first and rows padded for the
    collective. Without an initialised process group this is the identity (offset 0).
    """
    rank, world = _distributed_world()
    if world == 1:
        return features, 0
    count = torch.tensor([features.shape[0]], device=features.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = F.pad(features.detach(), (0, 0, 0, longest - features.shape[0]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    pieces = [part[:size] for part, size in zip(parts, sizes)]
    pieces[rank] = features  # gradient flows through this rank's own rows only
    return torch.cat(pieces, dim=0), sum(sizes[:rank])


def symmetric_infonce(feat_a: torch.Tensor, feat_b: torch.Tensor, temperature: float = 0.2,
                      gather: bool = True) -> dict[str, torch.Tensor]:
    """VIMPAC's symmetric InfoNCE (Eq. 19/20) between two clips of each video.

    Features are L2-normalised. Direction a: for local row i, logits over the gathered batch are
    ``[a_i . b_all / tau | a_i . a_all / tau with its own entry removed]`` and the positive is
    ``b_i``; direction b swaps the roles. Returns ``loss_a``, ``loss_b`` (means over local rows) and
    ``accuracy`` (fraction of rows whose positive has the highest logit, both directions).
    """
    if feat_a.shape != feat_b.shape or feat_a.dim() != 2:
        raise ValueError(f"clip features must both be (N, C), got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}")
    a = F.normalize(feat_a.float(), dim=-1)
    b = F.normalize(feat_b.float(), dim=-1)
    if gather:
        a_all, offset = gather_with_local_grad(a)
        b_all, _ = gather_with_local_grad(b)
    else:
        a_all, b_all, offset = a, b, 0
    rows = a.shape[0]
    positives = torch.arange(rows, device=a.device) + offset
    self_mask = torch.zeros(rows, a_all.shape[0], dtype=torch.bool, device=a.device)
    self_mask[torch.arange(rows, device=a.device), positives] = True

    def direction(query: torch.Tensor, other_all: torch.Tensor, same_all: torch.Tensor):
        cross = query @ other_all.t() / temperature
        same = (query @ same_all.t() / temperature).masked_fill(self_mask, float("-inf"))
        logits = torch.cat([cross, same], dim=1)
        loss = F.cross_entropy(logits, positives)
        correct = (logits.argmax(dim=1) == positives).float()
        return loss, correct

    loss_a, correct_a = direction(a, b_all, a_all)
    loss_b, correct_b = direction(b, a_all, b_all)
    return {"loss_a": loss_a, "loss_b": loss_b, "accuracy": torch.cat([correct_a, correct_b]).mean(),
            "correct_a": correct_a, "correct_b": correct_b}


def _vq_sources(data_cfg, split: str) -> list:
    """The data sources of a split; a source's VQ tokens are ``vq`` (or ``tsv`` when ``vq`` is unset)."""
    sources = list(data_cfg.sources(split))
    for source in sources:
        if not (source.vq or source.tsv):
            raise ValueError(f"data.{split}: a VIMPAC source needs `vq` (VQ token TSV/.npz/sidecar), got {source}")
    return sources


def _clip_geometry(options: dict, data_cfg) -> dict:
    grid = options["grid"]
    if grid is not None and (len(grid) != 2 or min(grid) < 1):
        raise ValueError(f"task.options.grid must be [h, w] token counts, got {grid!r}")
    return {"clip_frames": int(options["clip_frames"] or data_cfg.num_frames),
            "frame_stride": int(options["frame_stride"]),
            "grid": tuple(int(g) for g in grid) if grid is not None else None}


def _one_dataset(parts: list, sources: list, split: str) -> dict:
    if len(parts) == 1 and sources[0].weight == 1.0:
        return {split: parts[0]}
    return {split: MixedDataset(parts, [source.weight for source in sources])}


def _sync_batchnorm(heads: nn.ModuleDict, name: str, task: str) -> None:
    """BatchNorms of ``heads[name]`` -> SyncBatchNorm on multi-rank runs (statistics over the global batch)."""
    _, world = _distributed_world()
    if world == 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in heads[name].modules()):
        return
    if dist.get_backend() == "gloo":
        # SyncBatchNorm has no CPU kernel: CPU runs keep per-rank statistics
        log.warning("%s: gloo backend, BatchNorm of heads.%s stays per-rank", task, name)
        return
    heads[name] = nn.SyncBatchNorm.convert_sync_batchnorm(heads[name])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _require_vimpac(model: nn.Module, task: str) -> None:
    if not isinstance(model, VimpacModel):
        raise TypeError(f"task {task!r} needs a VIMPAC model (vimpac-small/-base/-large-half), got {type(model).__name__}")


def _tokens(batch: dict, key: str, device: torch.device) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"VIMPAC batch has no {key!r} (keys: {sorted(batch)}); the data source needs a VQ token sidecar")
    tokens = batch[key].to(device, non_blocking=True).long()
    if tokens.dim() != 4:
        raise ValueError(f"batch[{key!r}] must be (B, T, H, W) token ids, got {tuple(tokens.shape)}")
    return tokens


@TASKS.register("vimpac_pretrain")
class VimpacPretrainTask(Task):
    """Masked VQ-token prediction + contrastive learning between two clips of a video."""

    reads_frames = False

    def build(self) -> None:
        _require_vimpac(self.model, "vimpac_pretrain")
        self.options = parse_options("vimpac_pretrain", self.cfg.options or {}, PRETRAIN_OPTIONS)
        if self.options["masking"] not in ("block", "iid"):
            raise ValueError(f"task.options.masking must be 'block' or 'iid', got {self.options['masking']!r}")
        if self.options["temperature"] <= 0:
            raise ValueError(f"task.options.temperature must be > 0, got {self.options['temperature']}")
        config = self.model.config
        self.heads["mlm"] = VimpacTokenHead(config, self.model.token_embeddings)
        if self.options["contrastive"]:
            self.heads["contrastive"] = VimpacContrastiveHead(
                config.hidden_size, self.options["contrastive_hidden"], self.options["contrastive_out"], config.init_std)
        self._maybe_sync_batchnorm()

    def _maybe_sync_batchnorm(self) -> None:
        if "contrastive" in self.heads and self.options["sync_batchnorm"]:
            _sync_batchnorm(self.heads, "contrastive", "vimpac_pretrain")

    def build_datasets(self, data_cfg, tokenizer, split: str) -> dict:
        """Two clips per video (``vq_tokens``, ``vq_tokens_b``) from each source's VQ tokens; the videos
        are those of ``annotations`` (any annotation format) for ``source.split``."""
        sources = _vq_sources(data_cfg, split)
        geometry = _clip_geometry(self.options, data_cfg)
        parts = [VQPretrainDataset(source.vq or source.tsv, annotations=source.annotations, split=source.split,
                                   contrastive=bool(self.options["contrastive"]),
                                   pad_id=self.model.config.pad_id, **geometry) for source in sources]
        return _one_dataset(parts, sources, split)

    def _mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return mask_vq_tokens(tokens, self.model.config.pad_id, strategy=self.options["masking"],
                              ratio=self.options["mask_ratio"], num_blocks=self.options["num_blocks"])

    def _shared_forward(self, batch: dict):
        device = _model_device(self.model)
        clips = [_tokens(batch, "vq_tokens", device)]
        contrastive = "contrastive" in self.heads
        if contrastive:
            clips.append(_tokens(batch, "vq_tokens_b", device))
            if clips[1].shape != clips[0].shape:
                raise ValueError(f"the two clips differ in shape: {tuple(clips[0].shape)} vs {tuple(clips[1].shape)}")
        tokens = torch.cat(clips, dim=0)
        mask = self._mask(tokens)
        inputs = tokens.masked_fill(mask, self.model.config.mask_id)
        output = self.model(inputs)
        return tokens, mask, output, contrastive

    def _mask_logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # the head runs only at masked positions; targets are always real codes, so specials are cut
        logits = self.heads["mlm"](hidden[mask])
        return logits[:, : self.model.config.codebook_size].float()

    def forward(self, batch: dict) -> dict:
        tokens, mask, output, contrastive = self._shared_forward(batch)
        targets = tokens[mask]
        if targets.numel():
            logits = self._mask_logits(output.hidden, mask)
            mask_loss = F.cross_entropy(logits, targets)
            mask_acc = (logits.argmax(dim=1) == targets).float().mean()
        else:  # nothing maskable (all [PAD]): keep the graph, contribute nothing
            mask_loss = output.hidden.sum() * 0.0
            mask_acc = mask_loss.detach()
        result = {"mask_loss": mask_loss, "mask_acc": mask_acc.detach(), "mask_ratio": mask.float().mean()}
        loss = mask_loss
        if contrastive:
            features = self.heads["contrastive"](output.cls)
            feat_a, feat_b = features.chunk(2, dim=0)
            tau = self.options["temperature"]
            nce = symmetric_infonce(feat_a, feat_b, tau, gather=True)
            contrastive_loss = self.options["alpha"] * tau * (nce["loss_a"] + nce["loss_b"])
            loss = loss + contrastive_loss
            result.update(contrastive_loss=contrastive_loss, contrastive_acc=nce["accuracy"].detach())
        result["loss"] = loss
        return result

    @torch.no_grad()
    def evaluate_step(self, batch: dict) -> dict:
        """Per clip-pair: masked tokens, correct predictions, summed CE; contrastive hit (in-batch)."""
        tokens, mask, output, contrastive = self._shared_forward(batch)
        rows = tokens.shape[0]
        correct = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        nll = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        if mask.any():
            logits = self._mask_logits(output.hidden, mask)
            targets = tokens[mask]
            correct[mask] = (logits.argmax(dim=1) == targets).float()
            nll[mask] = F.cross_entropy(logits, targets, reduction="none")
        half = rows // 2 if contrastive else rows

        def per_clip(values: torch.Tensor) -> torch.Tensor:
            # per video: summed over positions and over its two clips (rows i and half + i)
            return values.flatten(1).sum(dim=1).view(-1, half).sum(dim=0)

        out = {"index": torch.as_tensor(batch.get("index", torch.arange(half))).reshape(-1).cpu(),
               "masked": per_clip(mask.float()).cpu(), "masked_correct": per_clip(correct).cpu(),
               "masked_nll": per_clip(nll).cpu()}
        if contrastive:
            features = self.heads["contrastive"](output.cls)
            nce = symmetric_infonce(*features.chunk(2, dim=0), self.options["temperature"], gather=False)
            out["contrastive_correct"] = ((nce["correct_a"] + nce["correct_b"]) / 2).cpu()
        return out

    def evaluate_end(self, outputs: List[dict], world=None) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        masked = float(merged["masked"].sum()) if "masked" in merged else 0.0
        metrics = {"mask_acc": float(merged["masked_correct"].sum()) / max(masked, 1.0),
                   "mask_loss": float(merged["masked_nll"].sum()) / max(masked, 1.0)}
        if "contrastive_correct" in merged:
            metrics["contrastive_acc"] = float(merged["contrastive_correct"].float().mean())
        return metrics


@TASKS.register("vimpac_action")
class VimpacActionTask(Task):
    """Action classification from [CLS] with a zero-initialised linear head; multi-view evaluation."""

    reads_frames = False

    def build(self) -> None:
        _require_vimpac(self.model, "vimpac_action")
        self.options = parse_options("vimpac_action", self.cfg.options or {}, ACTION_OPTIONS)
        num_classes = int(self.cfg.num_classes or 0)
        if num_classes < 2:
            raise ValueError(f"vimpac_action: set task.num_classes (>= 2), got {num_classes}")
        self.num_classes = num_classes
        self.heads["classifier"] = VimpacClassifier(self.model.hidden_size, num_classes, self.options["dropout"],
                                                    self.options["head_norm"])
        _sync_batchnorm(self.heads, "classifier", "vimpac_action")

    def build_datasets(self, data_cfg, tokenizer, split: str) -> dict:
        """One random clip per video when training; ``data.eval_clips`` x ``eval_crops`` views otherwise."""
        sources = _vq_sources(data_cfg, split)
        geometry = _clip_geometry(self.options, data_cfg)
        parts = []
        for source in sources:
            dataset = VQActionDataset(source.vq or source.tsv, source.annotations, split=source.split,
                                      train=split == "train", eval_clips=data_cfg.eval_clips,
                                      eval_crops=int(self.options["eval_crops"]), pad_id=self.model.config.pad_id,
                                      **geometry)
            if dataset.num_classes > self.num_classes:
                raise ValueError(f"{source.annotations} [{source.split}]: {dataset.num_classes} classes but "
                                 f"task.num_classes is {self.num_classes}")
            parts.append(dataset)
        return _one_dataset(parts, sources, split)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.heads["classifier"](self.model(tokens).cls).float()

    def forward(self, batch: dict) -> dict:
        device = _model_device(self.model)
        tokens = _tokens(batch, "vq_tokens", device)
        labels = batch["label"].to(device).long()
        logits = self.logits(tokens)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.options["label_smoothing"])
        return {"loss": loss, "acc": (logits.argmax(dim=1) == labels).float().mean().detach()}

    @torch.no_grad()
    def view_probabilities(self, views: torch.Tensor) -> torch.Tensor:
        """``(B, V, T, H, W)`` views -> class probabilities ``(B, C)`` averaged over the V views."""
        batch, count = views.shape[:2]
        flat = views.flatten(0, 1)
        chunk = max(1, int(self.options["eval_view_chunk"]))
        probs = torch.cat([self.logits(flat[i:i + chunk]).softmax(dim=-1) for i in range(0, flat.shape[0], chunk)])
        return probs.view(batch, count, -1).mean(dim=1)

    @torch.no_grad()
    def evaluate_step(self, batch: dict) -> dict:
        device = _model_device(self.model)
        if "vq_views" in batch:
            views = batch["vq_views"].to(device, non_blocking=True).long()
            if views.dim() != 5:
                raise ValueError(f"batch['vq_views'] must be (B, V, T, H, W), got {tuple(views.shape)}")
        else:
            views = _tokens(batch, "vq_tokens", device)[:, None]
        probs = self.view_probabilities(views)
        labels = batch["label"].to(device).long()
        top = probs.topk(min(5, self.num_classes), dim=1).indices
        return {"index": torch.as_tensor(batch.get("index", torch.arange(len(labels)))).reshape(-1).cpu(),
                "pred": top[:, 0].cpu(), "label": labels.cpu(),
                "top5": (top == labels[:, None]).any(dim=1).cpu()}

    def evaluate_end(self, outputs: List[dict], world=None) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        if not len(merged.get("label", [])):
            return {"acc": float("nan")}
        labels = merged["label"].long()
        metrics = {"acc": float((merged["pred"].long() == labels).float().mean()),
                   "count": float(labels.numel())}
        if self.num_classes > 5:
            metrics["top5_acc"] = float(merged["top5"].float().mean())
        return metrics
