"""Model library: registered backbones (`create_model`), task heads (`heads`), official checkpoints (`checkpoint_io`).

Importable without DeepSpeed. Every module of this package is imported here, so a model file registers
its variants with `@MODELS.register` (`violet.py`: violet-tiny / -v1 / -v2, `vimpac.py`: the VIMPAC sizes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from violet_ds.registry import MODELS, import_submodules
from violet_ds.weights import load_strict, strip_prefix

log = logging.getLogger(__name__)

import_submodules(__name__)


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


__all__ = ["create_model", "list_models", "print_models", "load_weights", "parameter_breakdown"]
