"""`2d_clip_feature`: CLIP ViT image-encoder patch features per VT token (feature).

VIOLETv2 advertises this target but its official code never implemented it; this is our version.
Teacher: `transformers.CLIPVisionModel` from a local `save_pretrained` folder (a full CLIP folder
works too: only the vision tower is loaded). Frames are renormalised with CLIP's mean/std (or the
folder's `preprocessor_config.json`) and run at the clip's size, interpolating the position
embeddings when it differs from the model's `image_size`. The patch tokens of the last layer
(`last_hidden_state` without the class token; `post_layernorm=True` applies CLIP's final LayerNorm
to them as well) form a `(H/p, W/p)` grid that is average-pooled onto the `(H/32, W/32)` VT grid
(ViT-B/16 at 224: 14x14 -> 7x7, each VT token = the mean of its 2x2 CLIP patches; ViT-B/32: 1:1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from violet_ds.registry import TARGETS

from .base import (Target, TargetOutput, TargetSpec, load_hf_model, pool_to_grid, preprocessor_mean_std,
                   renormalize)

# transformers' CLIP is imported when the teacher is built (importing the package imports every target)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@TARGETS.register("2d_clip_feature")
class CLIPFeatureTarget(Target):
    """CLIP ViT patch features pooled to the VT grid; channels = the ViT width (768 for ViT-B)."""

    name = "2d_clip_feature"

    def __init__(self, model_dir: Union[str, os.PathLike], post_layernorm: bool = False, loss: str = "l1",
                 patch: int = 32):
        super().__init__(patch)
        from transformers import CLIPVisionModel

        self.clip = load_hf_model(CLIPVisionModel, model_dir)
        config = self.clip.config
        self.vit_patch, self.image_size = int(config.patch_size), int(config.image_size)
        self.mean, self.std = preprocessor_mean_std(model_dir, CLIP_MEAN, CLIP_STD)
        self.post_layernorm = post_layernorm
        self.spec = TargetSpec("feature", int(config.hidden_size), loss)
        self.to(self.device, self.dtype)

    def teachers(self):
        return [self.clip]

    @classmethod
    def random_teacher(cls, root: Path, **variant) -> Dict[str, Any]:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16)  # ViT-B/16
        CLIPVisionModel(config).save_pretrained(root / "clip-vit-b16")
        return {"model_dir": str(root / "clip-vit-b16")}

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        b, t, _, height, width = video.shape
        if height % self.vit_patch or width % self.vit_patch:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the CLIP patch {self.vit_patch}")
        frames = renormalize(video.reshape(b * t, 3, height, width).to(self.device, self.dtype), self.mean, self.std)
        resized = (height, width) != (self.image_size, self.image_size)
        hidden = self.clip(pixel_values=frames, interpolate_pos_encoding=resized).last_hidden_state[:, 1:]
        if self.post_layernorm:
            hidden = self.clip.vision_model.post_layernorm(hidden)
        grid = hidden.reshape(b * t, height // self.vit_patch, width // self.vit_patch, -1)
        tokens = pool_to_grid(grid, (height // self.patch, width // self.patch))
        return TargetOutput(tokens.reshape(b, t, height // self.patch, width // self.patch, -1).to(video.device, video.dtype))
