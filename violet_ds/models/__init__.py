"""Model library: registered backbones (`create_model`), task heads (`heads`), official checkpoints (`checkpoint_io`).

Importable without DeepSpeed. Every module of this package is imported here, so a model file registers
its variants with `@MODELS.register` (`violet.py`: violet-tiny / -v1 / -v2, `vimpac.py`: the VIMPAC sizes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from torch import nn

from violet_ds.registry import MODELS, import_submodules
from violet_ds.weights import load_strict, strip_prefix

log = logging.getLogger(__name__)

import_submodules(__name__)

if TYPE_CHECKING:
    from violet_ds.config import ModelConfig


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


def build_model(model_cfg: "ModelConfig") -> nn.Module:
    """The model a run's `model:` section describes: registered name + overrides, weights, video attention
    kernel, activation checkpointing, compiled blocks."""
    overrides = dict(model_cfg.overrides)
    if model_cfg.text_config_dir:
        overrides.setdefault("text_config_dir", model_cfg.text_config_dir)
    if model_cfg.pretrained_swin:
        overrides.setdefault("pretrained_swin", model_cfg.pretrained_swin)
    if model_cfg.grad_checkpointing or model_cfg.offload_video_activations:
        overrides.update(grad_checkpointing=model_cfg.grad_checkpointing,
                         offload_activations=model_cfg.offload_video_activations)
    model = create_model(model_cfg.name, weights=model_cfg.weights, **overrides)
    if model_cfg.video_attention != "auto":
        backbone = getattr(model, "video_backbone", None)
        if backbone is None or not hasattr(backbone, "set_attention"):
            raise ValueError(f"model.video_attention={model_cfg.video_attention!r}: model {model_cfg.name!r} "
                             "has no Video Swin backbone")
        backbone.set_attention(model_cfg.video_attention)
    if model_cfg.compile:
        from violet_ds.models.compile import compile_blocks

        compile_blocks(model)
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


__all__ = ["build_model", "create_model", "list_models", "print_models", "load_weights", "parameter_breakdown"]
