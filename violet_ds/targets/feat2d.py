"""`2d_feature`: last-layer features of a frozen 2D Swin per VT token (feature) — VIOLETv2's best target.

Two teacher sources, both from local files:
- `model_dir`: a transformers `SwinModel` folder (`save_pretrained` layout; the official code uses
  transformers' Swin-B, ImageNet-22k, `last_hidden_state`). It runs at the clip's own size.
- `timm_model` + `checkpoint`: a timm Swin built by name with `pretrained=False` (plus `timm_kwargs`)
  and a state dict in timm's layout (`.pth`/`.safetensors`; the classifier `head.*` is ignored). timm
  Swins have a fixed input size: frames are resized to the model's `img_size` first.
The final-stage feature map (stride 32: 7x7 at 224, one feature per VT token, 1024 channels for
Swin-B) is mapped onto the VT grid (identity when the strides agree, else adaptive average pooling).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from violet_ds.data.frames import IMAGENET_MEAN, IMAGENET_STD
from violet_ds.registry import TARGETS
from violet_ds.weights import load_strict, read_state_dict

from .base import (Target, TargetOutput, TargetSpec, load_hf_model, pool_to_grid, preprocessor_mean_std,
                   renormalize, resize_frames)

# timm / transformers' Swin is imported when the teacher is built (the package imports every target)


# transformers SwinConfig fields of the official teacher (Swin-B, 224, window 7): the same keys and
# shapes as `feature_model.*` in VIOLETv2's 2d_feature pretraining state dict
SWIN_B_CONFIG = dict(image_size=224, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                     window_size=7)


def build_timm_swin(name: str, checkpoint: Union[str, os.PathLike], **kwargs) -> torch.nn.Module:
    """A timm model by name with `pretrained=False` and no classifier, loaded from a local state dict."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    load_strict(model, read_state_dict(checkpoint), f"{checkpoint} (timm {name})", ignore=("head.",))
    return model


@TARGETS.register("2d_feature")
class Swin2DFeatureTarget(Target):
    """2D Swin last-stage features per VT token; channels = the Swin's final width."""

    name = "2d_feature"

    def __init__(self, model_dir: Optional[Union[str, os.PathLike]] = None, timm_model: Optional[str] = None,
                 checkpoint: Optional[Union[str, os.PathLike]] = None, timm_kwargs: Optional[Dict[str, Any]] = None,
                 loss: str = "l1", patch: int = 32):
        super().__init__(patch)
        if (model_dir is None) == (timm_model is None):
            raise ValueError("2d_feature needs exactly one teacher: model_dir (transformers SwinModel folder) "
                             "or timm_model + checkpoint")
        if model_dir is not None:
            from transformers import SwinModel

            self.source = "transformers"
            self.swin = load_hf_model(SwinModel, model_dir)
            self.mean, self.std = preprocessor_mean_std(model_dir, IMAGENET_MEAN, IMAGENET_STD)
            channels = int(self.swin.config.hidden_size)
            self.input_size = None
        else:
            if checkpoint is None:
                raise ValueError(f"2d_feature with timm_model={timm_model!r} needs checkpoint=<state dict file>")
            self.source = "timm"
            self.swin = build_timm_swin(timm_model, checkpoint, **dict(timm_kwargs or {}))
            config = getattr(self.swin, "pretrained_cfg", {}) or {}
            self.mean = tuple(config.get("mean", IMAGENET_MEAN))
            self.std = tuple(config.get("std", IMAGENET_STD))
            channels = int(self.swin.num_features)
            self.input_size = tuple(self.swin.patch_embed.img_size)
        self.spec = TargetSpec("feature", channels, loss)
        self.to(self.device, self.dtype)

    def teachers(self):
        return [self.swin]

    @classmethod
    def random_teacher(cls, root: Path, **variant) -> Dict[str, Any]:
        from transformers import SwinConfig, SwinModel

        SwinModel(SwinConfig(**SWIN_B_CONFIG)).save_pretrained(root / "swin-base")
        return {"model_dir": str(root / "swin-base")}

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        b, t, _, height, width = video.shape
        frames = renormalize(video.reshape(b * t, 3, height, width).to(self.device, self.dtype), self.mean, self.std)
        if self.source == "transformers":
            hidden = self.swin(pixel_values=frames).last_hidden_state
            rows, cols = -(-height // self.swin.config.patch_size), -(-width // self.swin.config.patch_size)
            for _ in range(len(self.swin.config.depths) - 1):  # each patch merge halves, padding odd sides
                rows, cols = -(-rows // 2), -(-cols // 2)
            if rows * cols != hidden.shape[1]:
                raise RuntimeError(f"Swin returned {hidden.shape[1]} tokens for a {rows}x{cols} grid")
            grid = hidden.reshape(b * t, rows, cols, -1)
        else:
            grid = self.swin.forward_features(resize_frames(frames, self.input_size, mode="bicubic"))
            if grid.dim() == 3:  # timm variants that return tokens (N, L, C) instead of NHWC
                side = int(round(grid.shape[1] ** 0.5))
                grid = grid.reshape(b * t, side, grid.shape[1] // side, -1)
        tokens = pool_to_grid(grid, (height // self.patch, width // self.patch))
        return TargetOutput(tokens.reshape(b, t, height // self.patch, width // self.patch, -1).to(video.device, video.dtype))
