"""`depth`: monocular depth of each frame from a DPT model (transformers), 1 channel per pixel (dense).

Teacher: `transformers.DPTForDepthEstimation` from a local folder written by `save_pretrained` (e.g.
a copy of Intel/dpt-large, the MiDaS DPT-Large the official code uses). The frames are renormalised
with the folder's `preprocessor_config.json` mean/std (DPT's default 0.5/0.5) and run at the clip's
own size, or at `input_size` (a multiple of the ViT patch) when given; DPT interpolates its position
embeddings. The predicted map is resized back to the frame size.

MiDaS predicts *relative* inverse depth whose scale varies from frame to frame (values in the
hundreds or thousands), so by default each frame's map is min-max scaled to [0, 1]
(`normalize="frame"`); `normalize="none"` keeps the raw output (then consider `scale`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F

from violet_ds.registry import TARGETS

from .base import (Target, TargetOutput, TargetSpec, load_hf_model, preprocessor_mean_std, renormalize,
                   resize_frames)

# transformers' DPT is imported when the teacher is built (importing the package imports every target)

DPT_MEAN = (0.5, 0.5, 0.5)
DPT_STD = (0.5, 0.5, 0.5)


@TARGETS.register("depth")
class DepthTarget(Target):
    """DPT depth per pixel, per-frame min-max normalised by default."""

    name = "depth"

    def __init__(self, model_dir: Union[str, os.PathLike], input_size: Optional[int] = None,
                 normalize: str = "frame", scale: float = 1.0, loss: str = "l1", patch: int = 32):
        super().__init__(patch)
        from transformers import DPTForDepthEstimation

        if normalize not in ("frame", "none"):
            raise ValueError(f"depth normalize must be 'frame' or 'none', got {normalize!r}")
        self.dpt = load_hf_model(DPTForDepthEstimation, model_dir)
        vit_patch = int(self.dpt.config.patch_size)
        if input_size is not None and input_size % vit_patch:
            raise ValueError(f"depth input_size {input_size} is not a multiple of the DPT patch {vit_patch}")
        self.vit_patch, self.input_size = vit_patch, input_size
        self.mean, self.std = preprocessor_mean_std(model_dir, DPT_MEAN, DPT_STD)
        self.normalize, self.scale = normalize, scale
        self.spec = TargetSpec("dense", 1, loss)
        self.to(self.device, self.dtype)

    def teachers(self):
        return [self.dpt]

    @classmethod
    def random_teacher(cls, root: Path, **variant) -> Dict[str, Any]:
        from transformers import DPTConfig, DPTForDepthEstimation

        # Intel/dpt-large (MiDaS DPT-Large): ViT-L/16 at 384, hooks after layers 5/11/17/23
        config = DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           image_size=384, patch_size=16, backbone_out_indices=[5, 11, 17, 23],
                           neck_hidden_sizes=[256, 512, 1024, 1024], fusion_hidden_size=256)
        DPTForDepthEstimation(config).save_pretrained(root / "dpt-large")
        return {"model_dir": str(root / "dpt-large")}

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        b, t, _, height, width = video.shape
        frames = renormalize(video.reshape(b * t, 3, height, width).to(self.device, self.dtype), self.mean, self.std)
        if self.input_size is not None:
            size = (self.input_size, self.input_size)
        else:
            # VT patch multiples are usually DPT patch multiples already; round up when they are not
            size = tuple(-(-s // self.vit_patch) * self.vit_patch for s in (height, width))
        depth = self.dpt(pixel_values=resize_frames(frames, size, mode="bicubic")).predicted_depth
        depth = F.interpolate(depth[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)
        if self.normalize == "frame":
            low = depth.amin(dim=(2, 3), keepdim=True)
            high = depth.amax(dim=(2, 3), keepdim=True)
            spread = high - low
            # no absolute epsilon: depth units are arbitrary (a small model may output 1e-8); a flat map gives 0
            depth = torch.where(spread > 0, (depth - low) / torch.where(spread > 0, spread, 1.0), 0.0)
        depth = depth * self.scale
        return TargetOutput(depth.reshape(b, t, 1, height, width).to(video.device, video.dtype))
