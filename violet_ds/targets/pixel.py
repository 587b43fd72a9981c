"""`pixel`: regress the normalised input frame itself (VIOLETv2's cheapest target)."""

from __future__ import annotations

import torch

from violet_ds.registry import TARGETS

from .base import Target, TargetOutput, TargetSpec


@TARGETS.register("pixel")
class PixelTarget(Target):
    """Dense 3-channel target: the ImageNet-normalised pixels of the unmasked clip; L1 by default."""

    name = "pixel"

    def __init__(self, loss: str = "l1", patch: int = 32):
        super().__init__(patch)
        self.spec = TargetSpec("dense", 3, loss)

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        # a copy: the caller masks the model's input in place afterwards in some tasks
        return TargetOutput(video.detach().clone())
