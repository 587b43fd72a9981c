"""Model library: registered backbones (`create_model`), task heads (`heads`), official checkpoints (`checkpoint_io`).

Importable without DeepSpeed. Registered here: `violet-tiny`, `violet-v1`, `violet-v2`; `vimpac.py`
registers the VIMPAC sizes on import.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from violet_ds.registry import MODELS
from violet_ds.weights import load_strict, strip_prefix

from .violet import VioletConfig, VioletModel, VioletOutput

log = logging.getLogger(__name__)

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

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(VioletConfig)}


def _violet_factory(name: str):
    def factory(**overrides) -> VioletModel:
        unknown = sorted(set(overrides) - _CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"model {name!r}: unknown overrides {unknown}; known: {sorted(_CONFIG_FIELDS)}")
        base = dict(VIOLET_VARIANTS[name])
        # swin_overrides merge rather than replace, so `swin_overrides={"depths": ...}` tweaks one field
        if "swin_overrides" in overrides:
            base["swin_overrides"] = {**base.get("swin_overrides", {}), **(overrides.pop("swin_overrides") or {})}
        cfg = VioletConfig(**{**base, **overrides})
        return VioletModel(cfg)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"Build the {name} backbone (overrides: any VioletConfig field)."
    return factory


for _name in VIOLET_VARIANTS:
    MODELS.register(_name)(_violet_factory(_name))

# vimpac.py is written alongside; its import registers the VIMPAC sizes
if importlib.util.find_spec(f"{__name__}.vimpac") is not None:
    from . import vimpac  # noqa: F401,E402


def list_models() -> List[str]:
    """Names of all registered models."""
    return MODELS.names()


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a violet_ds safetensors (or torch) weight file strictly into a bare model.

    Accepts exported task weights (keys `model.*` plus `heads.*`, the heads being ignored and
    reported), bare backbone weights, or an official VIOLET / VIOLETv2 / LAVENDER checkpoint (converted
    through `checkpoint_io`'s key map first). Raises naming the missing / unexpected keys.
    """
    from .checkpoint_io import read_violet_state_dict

    state = read_violet_state_dict(path)
    ignored = []
    if any(k.startswith("model.") for k in state):
        ignored = sorted(k for k in state if not k.startswith("model."))
        state = strip_prefix(state, "model.")
    load_strict(model, state, f"{path}: weights")
    if ignored:
        log.info("%s: ignored %d non-backbone keys (heads): %s", path, len(ignored), ignored[:8])
    return {"ignored": ignored}


def create_model(name: str, weights: Optional[str] = None, **overrides) -> nn.Module:
    """Build a registered model; `weights` = a violet_ds safetensors file (e.g. from `violet-ds export`)."""
    model = MODELS.create(name, **overrides)
    # recorded for save_pretrained (a model directory names the registered model it rebuilds)
    model.registered_name = name
    if weights:
        load_weights(model, weights)
    return model


def parameter_breakdown(model: nn.Module) -> Dict[str, int]:
    """Per-part parameter counts: the model's own grouping when it has one, else its top-level children."""
    if hasattr(model, "parameter_breakdown"):
        return model.parameter_breakdown()
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def print_models(names: Optional[List[str]] = None) -> None:
    """List the registered models with their parameter counts per part (in millions).

    Models are built on the meta device, so nothing is allocated or initialised.

    Args:
        names: only these models (default: all registered).
    """
    selected = names or list_models()
    for name in selected:
        with torch.device("meta"):
            model = create_model(name)
        parts = parameter_breakdown(model)
        total = parts.pop("total")
        detail = ", ".join(f"{part} {count / 1e6:.2f}M" for part, count in parts.items())
        print(f"{name:<20} {total / 1e6:8.2f}M  ({detail})")


__all__ = ["create_model", "list_models", "print_models", "load_weights", "parameter_breakdown",
           "VioletModel", "VioletConfig", "VioletOutput", "VIOLET_VARIANTS"]
