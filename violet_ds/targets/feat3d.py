"""`3d_feature`: last-stage features of a frozen Video Swin (Kinetics) per VT token (feature).

Teacher: our own `violet_ds.models.video_swin` (variant `base` = Swin-B by default), loaded with
`load_video_swin_weights` from a local file: an official Video Swin Kinetics checkpoint (keys under
`backbone.`, `cls_head.*` ignored), a bare state dict, or a timm 2D Swin (inflated). Kinetics models
embed 2-frame tubelets with temporal stride 2 (`temporal_stride=2`, the default here), so the
teacher yields ceil(T/2) feature maps: each is repeated for the 2 frames it covers, giving one
feature per VT token (frame t uses map t // 2). Spatially the stride is 32 like the VT (7x7 at 224);
other grids are average-pooled onto the VT grid. Channels = 1024 for Swin-B.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from violet_ds.registry import TARGETS
from violet_ds.weights import save_safetensors

from .base import Target, TargetOutput, TargetSpec, pool_to_grid

# violet_ds.models (timm, torchvision) is imported when the teacher is built (the package imports every target)


@TARGETS.register("3d_feature")
class VideoSwinFeatureTarget(Target):
    """Video Swin features per VT token; time maps repeated over their tubelet's frames."""

    name = "3d_feature"

    def __init__(self, checkpoint: Union[str, os.PathLike], variant: str = "base", temporal_stride: int = 2,
                 swin_overrides: Optional[Dict[str, Any]] = None, loss: str = "l1", patch: int = 32):
        super().__init__(patch)
        from violet_ds.models.video_swin import build_video_swin, load_video_swin_weights

        overrides = {"drop_path_rate": 0.0, "temporal_stride": temporal_stride, **dict(swin_overrides or {})}
        self.swin = build_video_swin(variant, **overrides)
        self.load_report = load_video_swin_weights(self.swin, str(checkpoint))
        self.spec = TargetSpec("feature", int(self.swin.num_features), loss)
        self.to(self.device, self.dtype)

    def teachers(self):
        return [self.swin]

    @classmethod
    def random_teacher(cls, root: Path, **variant) -> Dict[str, Any]:
        from violet_ds.models.video_swin import build_video_swin

        swin = build_video_swin("base", temporal_stride=2, drop_path_rate=0.0)
        save_safetensors({f"backbone.{k}": v for k, v in swin.state_dict().items()},
                         root / "swin_base_kinetics.safetensors")
        return {"checkpoint": str(root / "swin_base_kinetics.safetensors"), "variant": "base"}

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        b, t, _, height, width = video.shape
        h, w = height // self.patch, width // self.patch
        # the clip is already ImageNet-normalised, which is what the Kinetics Video Swins were trained on
        features = self.swin(video.to(self.device, self.dtype).transpose(1, 2))  # (B, T', h', w', C)
        steps = features.shape[1]
        # frame t belongs to tubelet floor(t * T' / T) (t // stride for stride-s embeddings)
        index = torch.div(torch.arange(t, device=features.device) * steps, t, rounding_mode="floor")
        features = features.index_select(1, index)
        tokens = pool_to_grid(features.reshape(b * t, *features.shape[2:]), (h, w))
        return TargetOutput(tokens.reshape(b, t, h, w, -1).to(video.device, video.dtype))
