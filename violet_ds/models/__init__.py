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
from violet_ds.weights import KeyReport, Weights, load_checked, strip_prefix

from .checkpoint_io import read_weights_file
from .common import count_parameters
from .compile import compile_blocks

log = logging.getLogger(__name__)

import_submodules(__name__)

if TYPE_CHECKING:
    from violet_ds.config import ModelConfig


def list_models() -> List[str]:
    """Names of all registered models."""
    return MODELS.names()


def load_weights(model: nn.Module, weights: str | Path | Weights) -> KeyReport:
    """Load weights strictly into a bare model: a `Weights` read by the weights entry
    (`violet_ds.engine.export.read_weights`), or a weight file / model directory, read here through its file
    half (`checkpoint_io.read_weights_file`).

    Accepts exported task weights (keys `model.*` plus `heads.*`, the heads being ignored and
    reported), bare backbone weights, or an official VIOLET / VIOLETv2 / LAVENDER checkpoint (converted
    through `checkpoint_io`'s key map first). Raises naming the missing / unexpected keys.
    """
    if not isinstance(weights, Weights):
        weights = read_weights_file(weights)
    state, source = weights.state, str(weights.path)
    task_keys = any(k.startswith("model.") for k in state)
    report = load_checked(model, strip_prefix(state, "model.") if task_keys else state, f"{source}: weights")
    if task_keys:
        report.ignored = sorted(k for k in state if not k.startswith("model."))
    if report.ignored:
        log.info("%s: ignored %d non-backbone keys (heads): %s", source, len(report.ignored), report.ignored[:8])
    return report


def create_model(name: str, weights: Optional[str | Path | Weights] = None, **overrides) -> nn.Module:
    """Build a registered model; `weights` = what `load_weights` takes (e.g. a file from `violet-ds export`)."""
    model = MODELS.create(name, **overrides)
    if weights:
        load_weights(model, weights)
    return model


def build_model(model_cfg: "ModelConfig", weights: Optional[Weights] = None) -> nn.Module:
    """The model a run's `model:` section describes: registered name + overrides, video attention kernel,
    activation checkpointing and initial weights at construction, then compiled blocks.

    `weights`: `model.weights` as the weights entry read it (the commands pass it, so that a run or checkpoint
    directory is accepted); without it, `model.weights` is read as a weight file or model directory.
    """
    model = create_model(model_cfg.name, weights=weights or model_cfg.weights, **model_overrides(model_cfg))
    if model_cfg.compile:
        compile_blocks(model)
    return model


def model_overrides(model_cfg: "ModelConfig") -> Dict[str, object]:
    """The `create_model` overrides of a run's `model:` section (each field under its own name)."""
    overrides = dict(model_cfg.overrides)
    if model_cfg.text_config_dir:
        overrides.setdefault("text_config_dir", model_cfg.text_config_dir)
    if model_cfg.pretrained_swin:
        overrides.setdefault("pretrained_swin", model_cfg.pretrained_swin)
    if model_cfg.grad_checkpointing or model_cfg.offload_activations:
        overrides.update(grad_checkpointing=model_cfg.grad_checkpointing,
                         offload_activations=model_cfg.offload_activations)
    if model_cfg.video_attention != "auto":
        overrides["video_attention"] = model_cfg.video_attention
    return overrides


def parameter_breakdown(model: nn.Module) -> Dict[str, int]:
    """Per-part parameter counts: the model's own grouping when it has one, else its top-level children."""
    if hasattr(model, "parameter_breakdown"):
        return model.parameter_breakdown()
    parts = {name: count_parameters(child) for name, child in model.named_children()}
    parts["total"] = count_parameters(model)
    return parts


def model_sizes(names: Optional[List[str]] = None) -> Dict[str, Dict[str, int]]:
    """Parameter counts per part (`parameter_breakdown`, `total` included) of the registered models (default:
    all). Models are built on the meta device, so nothing is allocated or initialised."""
    sizes = {}
    for name in names or list_models():
        with torch.device("meta"):
            sizes[name] = parameter_breakdown(create_model(name))
    return sizes


__all__ = ["build_model", "count_parameters", "create_model", "list_models", "model_sizes", "load_weights", "model_overrides",
           "parameter_breakdown"]
