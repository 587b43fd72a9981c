"""VIMPAC: a post-LayerNorm transformer over DALL-E VQ-token grids with "T,H|W" attention.

Read top to bottom: configuration and the three registered sizes, positional embeddings, the
factorised attention, one layer, the transformer (``.backbone``), the registered model, the heads
(owned by tasks, defined here because they are VIMPAC-specific).

Layout: a clip is a token grid ``(T, H, W)`` (``H = height_px / 8``). Hidden states are kept as
``(B, T, H, W, D)`` plus one [CLS] vector ``(B, D)`` per clip, so every axis attention is a reshape
of the same tensor and never a Python loop over frames or rows.

"T,H|W" attention (docs/reference.md#3-vimpac): a temporal attention over the frames of each spatial location,
then a spatial attention whose heads are split into a height half (over the rows of each column) and
a width half (over the columns of each row); the two halves are concatenated before one shared
output projection. Each attention and the MLP is a post-LN residual sub-layer. [CLS] is prepended to
every attended line (so it attends, and is attended, along every axis); its outputs from all lines
are averaged.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from violet_ds.config import check_field_types
from violet_ds.data.vq_clips import VQ_CODEBOOK_SIZE, VQ_MASK_ID, VQ_PAD_ID, VQ_VOCAB_ROWS
from violet_ds.registry import MODELS

from .common import count_parameters

log = logging.getLogger(__name__)


def _refuse_offload(offload: bool) -> None:
    if offload:
        raise ValueError("VIMPAC does not offload activations; unset model.offload_activations")


@dataclass
class VimpacConfig:
    """Hyperparameters of one VIMPAC transformer (defaults = VIMPAC-Small at 5 x 16 x 16 tokens)."""

    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    head_dim: int = 64
    mlp_size: int = 2048
    vocab_size: int = VQ_VOCAB_ROWS
    codebook_size: int = VQ_CODEBOOK_SIZE
    pad_id: int = VQ_PAD_ID
    mask_id: int = VQ_MASK_ID
    # sizes of the positional-embedding tables; other grids are served by interpolation
    frames: int = 5
    height: int = 16
    width: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    # mask attention to [PAD] keys (short videos); costs the fused SDPA kernel only when PAD occurs
    mask_pad_attention: bool = True
    # activation checkpointing of every layer (`set_grad_checkpointing`)
    grad_checkpointing: bool = False
    # CPU offload of saved activations: VIOLET's video encoder only; here an error when set
    offload_activations: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)  # a configuration read from a file is named by key
        _refuse_offload(self.offload_activations)
        if self.num_heads < 2 or self.num_heads % 2:
            raise ValueError(f"num_heads must be even (height and width attention each take half), got {self.num_heads}")
        for name in ("hidden_size", "num_layers", "head_dim", "mlp_size", "frames", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"VimpacConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.codebook_size <= self.pad_id < self.vocab_size and self.codebook_size <= self.mask_id < self.vocab_size):
            raise ValueError(
                f"pad_id ({self.pad_id}) and mask_id ({self.mask_id}) must be special rows in "
                f"[codebook_size={self.codebook_size}, vocab_size={self.vocab_size})")

    @property
    def attention_size(self) -> int:
        return self.num_heads * self.head_dim


VIMPAC_SIZES: dict[str, dict] = {
    "vimpac-small": dict(hidden_size=512, num_layers=6, num_heads=8, head_dim=64, mlp_size=2048),
    "vimpac-base": dict(hidden_size=768, num_layers=12, num_heads=12, head_dim=64, mlp_size=3072),
    # "half": attention width 16 x 32 = 512 and MLP 2048, half of a standard large layer
    "vimpac-large-half": dict(hidden_size=1024, num_layers=24, num_heads=16, head_dim=32, mlp_size=2048),
}


def make_config(name: str, **overrides) -> VimpacConfig:
    """The configuration of a registered size with ``overrides`` applied (unknown keys are errors)."""
    known = {field.name for field in dataclasses.fields(VimpacConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{name}: unknown override(s) {unknown}; known: {sorted(known)}")
    return VimpacConfig(**{**VIMPAC_SIZES[name], **overrides})


# --------------------------------------------------------------------------- positional embeddings

def resize_axis_embedding(table: torch.Tensor, size: int) -> torch.Tensor:
    """Linearly interpolate a ``(n, D)`` per-axis embedding table to ``(size, D)``.

    Used when a pretraining stage or a finetuning task feeds a different grid (e.g. 5x16x16 ->
    10x32x32): each axis is resampled independently because the embedding is factorised.
    """
    if table.shape[0] == size:
        return table
    resized = F.interpolate(table.t()[None].float(), size=size, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype)


class VimpacEmbeddings(nn.Module):
    """Token embedding + factorised positional embedding (T + H + W), LayerNorm, dropout; [CLS]."""

    def __init__(self, config: VimpacConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.token = nn.Embedding(config.vocab_size, dim)
        self.pos_t = nn.Parameter(torch.zeros(config.frames, dim))
        self.pos_h = nn.Parameter(torch.zeros(config.height, dim))
        self.pos_w = nn.Parameter(torch.zeros(config.width, dim))
        self.cls = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def position_embedding(self, t: int, h: int, w: int) -> torch.Tensor:
        """``(t, h, w, D)`` sum of the three axis tables, each interpolated to the grid when needed."""
        pos_t = resize_axis_embedding(self.pos_t, t)
        pos_h = resize_axis_embedding(self.pos_h, h)
        pos_w = resize_axis_embedding(self.pos_w, w)
        return pos_t[:, None, None] + pos_h[None, :, None] + pos_w[None, None, :]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, t, h, w = tokens.shape
        hidden = self.token(tokens) + self.position_embedding(t, h, w)
        hidden = self.dropout(self.norm(hidden))
        cls = self.dropout(self.norm(self.cls)).expand(batch, -1)
        return hidden, cls

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint from another pretraining stage has other table lengths: resample, say so.
        for name in ("pos_t", "pos_h", "pos_w"):
            key = prefix + name
            own = getattr(self, name)
            if key in state_dict and state_dict[key].dim() == 2 and state_dict[key].shape[1] == own.shape[1] \
                    and state_dict[key].shape[0] != own.shape[0]:
                log.info("interpolating %s from %d to %d positions", key, state_dict[key].shape[0], own.shape[0])
                state_dict[key] = resize_axis_embedding(state_dict[key], own.shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --------------------------------------------------------------------------- attention

def _attend_lines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cls_q: torch.Tensor, cls_k: torch.Tensor, cls_v: torch.Tensor,
                  axis: int, valid: Optional[torch.Tensor], dropout_p: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention along one grid axis with [CLS] prepended to every line.

    q, k, v: ``(B, T, H, W, n, d)`` for the ``n`` heads serving this axis; cls_*: ``(B, n, d)``;
    axis: 1 (T), 2 (H) or 3 (W); valid: optional bool ``(B, T, H, W)`` of keys that may be attended.
    Returns grid outputs ``(B, T, H, W, n, d)`` and the [CLS] output averaged over lines ``(B, n, d)``.
    """
    batch, n_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]

    def to_lines(x: torch.Tensor) -> torch.Tensor:
        # (B, T, H, W, n, d) -> (B, a, b, n, L, d): the attended axis becomes the sequence axis
        return x.movedim(axis, 4)

    q_lines, k_lines, v_lines = to_lines(q), to_lines(k), to_lines(v)
    line_shape = q_lines.shape[:3]  # (B, a, b)
    length = q_lines.shape[4]
    num_lines = line_shape[1] * line_shape[2]

    def with_cls(lines: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        cls_lines = cls[:, None, None, :, None, :].expand(*line_shape, n_heads, 1, head_dim)
        return torch.cat([cls_lines, lines], dim=4).reshape(-1, n_heads, length + 1, head_dim)

    attn_mask = None
    line_valid = None
    if valid is not None:
        key_valid = valid.movedim(axis, 3).reshape(-1, length)  # (N, L)
        line_valid = key_valid.any(dim=1).view(batch, num_lines)
        # [CLS] is always a valid key, so no query row is ever fully masked (no NaN)
        key_valid = torch.cat([key_valid.new_ones(key_valid.shape[0], 1), key_valid], dim=1)
        attn_mask = key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        with_cls(q_lines, cls_q), with_cls(k_lines, cls_k), with_cls(v_lines, cls_v),
        attn_mask=attn_mask, dropout_p=dropout_p)
    out = out.reshape(*line_shape, n_heads, length + 1, head_dim)
    grid_out = out[:, :, :, :, 1:].movedim(4, axis)
    cls_lines = out[:, :, :, :, 0].reshape(batch, num_lines, n_heads, head_dim)
    if line_valid is None:
        cls_out = cls_lines.mean(dim=1)
    else:
        # lines made only of [PAD] (padded frames) would just echo [CLS]: leave them out of the mean
        weight = line_valid.to(cls_lines.dtype)
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1.0)
        cls_out = torch.einsum("bl,blnd->bnd", weight, cls_lines)
    return grid_out, cls_out


class AxisAttention(nn.Module):
    """Multi-head attention whose heads are shared out among grid axes, with one output projection.

    ``axes`` lists ``(axis, num_heads)``: temporal attention is ``[(1, n)]``; VIMPAC's "H|W"
    spatial attention is ``[(2, n/2), (3, n/2)]``.
    """

    def __init__(self, config: VimpacConfig, axes: Sequence[tuple[int, int]]):
        super().__init__()
        if sum(count for _, count in axes) != config.num_heads:
            raise ValueError(f"axis head counts {axes} must add up to num_heads={config.num_heads}")
        self.axes = tuple((int(axis), int(count)) for axis, count in axes)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.attention_size)
        self.proj = nn.Linear(config.attention_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout

    def forward(self, hidden: torch.Tensor, cls: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = hidden.shape[:4]
        q, k, v = self.qkv(hidden).view(*grid, 3, self.num_heads, self.head_dim).unbind(dim=4)
        cls_q, cls_k, cls_v = self.qkv(cls).view(-1, 3, self.num_heads, self.head_dim).unbind(dim=1)
        dropout_p = self.attention_dropout if self.training else 0.0
        grid_parts, cls_parts, first = [], [], 0
        for axis, count in self.axes:  # at most two axes: height heads then width heads
            heads = slice(first, first + count)
            first += count
            grid_out, cls_out = _attend_lines(
                q[..., heads, :], k[..., heads, :], v[..., heads, :],
                cls_q[:, heads], cls_k[:, heads], cls_v[:, heads], axis, valid, dropout_p)
            grid_parts.append(grid_out)
            cls_parts.append(cls_out)
        grid_out = torch.cat(grid_parts, dim=-2) if len(grid_parts) > 1 else grid_parts[0]
        cls_out = torch.cat(cls_parts, dim=-2) if len(cls_parts) > 1 else cls_parts[0]
        return self.proj(grid_out.flatten(-2)), self.proj(cls_out.flatten(-2))


class VimpacLayer(nn.Module):
    """Post-LN layer: temporal attention, H|W spatial attention, GELU MLP; each a residual + LayerNorm."""

    def __init__(self, config: VimpacConfig):
        super().__init__()
        half = config.num_heads // 2
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.temporal = AxisAttention(config, [(1, config.num_heads)])
        self.norm_temporal = nn.LayerNorm(dim, eps=eps)
        self.spatial = AxisAttention(config, [(2, half), (3, config.num_heads - half)])
        self.norm_spatial = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_size), nn.GELU(), nn.Linear(config.mlp_size, dim))
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, cls: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        update, cls_update = self.temporal(hidden, cls, valid)
        hidden = self.norm_temporal(hidden + self.dropout(update))
        cls = self.norm_temporal(cls + self.dropout(cls_update))
        update, cls_update = self.spatial(hidden, cls, valid)
        hidden = self.norm_spatial(hidden + self.dropout(update))
        cls = self.norm_spatial(cls + self.dropout(cls_update))
        hidden = self.norm_mlp(hidden + self.dropout(self.mlp(hidden)))
        cls = self.norm_mlp(cls + self.dropout(self.mlp(cls)))
        return hidden, cls


# --------------------------------------------------------------------------- transformer

class VimpacOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, H, W, D)
    cls: torch.Tensor     # (B, D)


class VimpacTransformer(nn.Module):
    """Embeddings + ``num_layers`` T,H|W layers over a VQ-token grid ``(B, T, H, W)``."""

    def __init__(self, config: VimpacConfig):
        super().__init__()
        self.config = config
        self.embeddings = VimpacEmbeddings(config)
        self.layers = nn.ModuleList(VimpacLayer(config) for _ in range(config.num_layers))
        self.grad_checkpointing = config.grad_checkpointing
        self.apply(self._init_weights)
        for table in (self.embeddings.pos_t, self.embeddings.pos_h, self.embeddings.pos_w, self.embeddings.cls):
            nn.init.normal_(table, std=config.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> VimpacOutput:
        """tokens: long ``(B, T, H, W)``; attention_mask: optional bool ``(B, T, H, W)`` of attendable keys.

        Without ``attention_mask`` and with ``config.mask_pad_attention``, [PAD] keys are masked
        when any [PAD] is present (so a batch without [PAD] keeps the fused attention kernel).
        """
        if tokens.dim() != 4:
            raise ValueError(f"VIMPAC expects token grids (B, T, H, W), got shape {tuple(tokens.shape)}")
        valid = attention_mask
        if valid is None and self.config.mask_pad_attention:
            is_pad = tokens == self.config.pad_id
            valid = ~is_pad if bool(is_pad.any()) else None
        elif valid is not None:
            valid = valid.to(torch.bool)
        hidden, cls = self.embeddings(tokens)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden, cls = checkpoint(layer, hidden, cls, valid, use_reentrant=False)
            else:
                hidden, cls = layer(hidden, cls, valid)
        return VimpacOutput(hidden, cls)


class VimpacModel(nn.Module):
    """The registered VIMPAC model: ``.backbone`` is the transformer; heads belong to tasks."""

    def __init__(self, config: VimpacConfig, registered_name: Optional[str] = None):
        """`registered_name`: the registered size this is (its factory passes it)."""
        super().__init__()
        self.config = config
        self.registered_name = registered_name
        self.backbone = VimpacTransformer(config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def token_embeddings(self) -> nn.Embedding:
        """The token embedding, for the tied token-prediction head."""
        return self.backbone.embeddings.token

    def set_grad_checkpointing(self, enable: bool = True, offload: bool = False) -> None:
        """Recompute each layer in backward (``torch.utils.checkpoint``, non-reentrant); ``offload`` is refused."""
        _refuse_offload(offload)
        self.backbone.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> VimpacOutput:
        return self.backbone(tokens, attention_mask)


def _register(name: str):
    def factory(**overrides) -> VimpacModel:
        return VimpacModel(make_config(name, **overrides), registered_name=name)

    return MODELS.add(name, factory, f"{name}: {VIMPAC_SIZES[name]} (override any VimpacConfig field).")


_register("vimpac-small")
_register("vimpac-base")
_register("vimpac-large-half")


# --------------------------------------------------------------------------- heads

class VimpacTokenHead(nn.Module):
    """Masked-token head: Linear + GELU + LayerNorm, then a decoder tied to the token embedding.

    The embedding is referenced, not registered, so the tied matrix is stored once (under the
    backbone) in checkpoints and safetensors exports; only the decoder bias belongs to the head.
    """

    def __init__(self, config: VimpacConfig, token_embeddings: nn.Embedding):
        super().__init__()
        dim = config.hidden_size
        self.transform = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(token_embeddings.num_embeddings))
        object.__setattr__(self, "tied_embeddings", token_embeddings)
        nn.init.normal_(self.transform.weight, std=config.init_std)
        nn.init.zeros_(self.transform.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``(..., D)`` -> logits ``(..., vocab_size)``."""
        hidden = self.norm(self.act(self.transform(hidden)))
        return F.linear(hidden, self.tied_embeddings.weight, self.bias)


class VimpacContrastiveHead(nn.Module):
    """3-layer MLP on [CLS]: ``D -> 4096 -> 4096 -> 256`` with BatchNorm + ReLU after the hidden layers.

    Tasks convert the BatchNorms to SyncBatchNorm when training on several ranks.
    """

    def __init__(self, hidden_size: int, inner_size: int = 4096, out_size: int = 256, init_std: float = 0.02):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, inner_size), nn.BatchNorm1d(inner_size), nn.ReLU(inplace=True),
            nn.Linear(inner_size, inner_size), nn.BatchNorm1d(inner_size), nn.ReLU(inplace=True),
            nn.Linear(inner_size, out_size),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=init_std)
                nn.init.zeros_(module.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(cls)


class VimpacClassifier(nn.Module):
    """Action-classification head on [CLS]: dropout + a zero-initialised linear layer.

    ``norm="batch"`` (not in the paper, off by default) puts a parameter-free BatchNorm before the
    linear layer. It removes the component of [CLS] shared by every clip of the batch: when most
    tokens of every clip are alike (static backgrounds, as in the synthetic demo videos), that
    shared component dominates the zero-initialised layer's gradient and finetuning barely moves.
    """

    def __init__(self, hidden_size: int, num_classes: int, dropout: float = 0.0, norm: Optional[str] = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if norm not in (None, "none", "batch"):
            raise ValueError(f"classifier norm must be None, 'none' or 'batch', got {norm!r}")
        self.norm = nn.BatchNorm1d(hidden_size, affine=False) if norm == "batch" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_classes)
        # zero init (VIMPAC finetuning): the first steps do not disturb the pretrained features
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.norm(cls)))


# --------------------------------------------------------------------------- sizes

def parameter_counts(name: str, **overrides) -> dict[str, int]:
    """Parameters per part of a registered VIMPAC size (built on the meta device: no memory).

    Parts: token embedding, positional embeddings (+[CLS] + embedding LayerNorm), temporal
    attention, spatial attention, MLP and LayerNorms (summed over layers), token head (without the
    tied matrix), contrastive head, and totals.
    """
    with torch.device("meta"):
        model = MODELS.create(name, **overrides)
        token_head = VimpacTokenHead(model.config, model.token_embeddings)
        contrastive_head = VimpacContrastiveHead(model.hidden_size)
    embeddings = model.backbone.embeddings
    layers = model.backbone.layers
    counts = {
        "token_embedding": count_parameters(embeddings.token),
        "position_embedding": embeddings.pos_t.numel() + embeddings.pos_h.numel() + embeddings.pos_w.numel()
        + embeddings.cls.numel() + count_parameters(embeddings.norm),
        "temporal_attention": sum(count_parameters(layer.temporal) for layer in layers),
        "spatial_attention": sum(count_parameters(layer.spatial) for layer in layers),
        "mlp": sum(count_parameters(layer.mlp) for layer in layers),
        "layer_norms": sum(count_parameters(layer.norm_temporal) + count_parameters(layer.norm_spatial)
                           + count_parameters(layer.norm_mlp) for layer in layers),
        "token_head": count_parameters(token_head),
        "contrastive_head": count_parameters(contrastive_head),
    }
    counts["backbone"] = count_parameters(model.backbone)
    counts["pretraining_total"] = counts["backbone"] + counts["token_head"] + counts["contrastive_head"]
    return counts
