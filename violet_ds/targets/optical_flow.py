"""`optical_flow`: RAFT flow from frame t to frame t+1, 2 channels per pixel (dense).

Teacher: torchvision's RAFT (`raft_large`, the official choice, or the cheaper `raft_small`) built
with `weights=None` and loaded from a local state dict in torchvision's own format (the files
torchvision downloads, e.g. `raft_large_C_T_SKHT_V2-ff5fadd5.pth`, or any `model.state_dict()` saved
with torch.save / safetensors). 12 refinement iterations as in the official code.

Layout: frame t carries the flow t -> t+1 in pixels `(dx, dy)` at the clip's resolution. The last
frame has no successor and a pair whose flow reaches `max_flow` (50 px, the official filter) in
either component anywhere is unreliable: both are marked invalid in `valid (B, T)` and carry zeros,
so they never contribute to the loss. RAFT needs sides divisible by 8 (every VT-patch multiple is)
and at least 128: smaller frames are upscaled for RAFT and the flow rescaled to the frame's pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

import torch
import torch.nn.functional as F

from violet_ds.data.frames import to_unit_range
from violet_ds.registry import TARGETS
from violet_ds.weights import load_strict, read_state_dict, save_safetensors

from .base import Target, TargetOutput, TargetSpec, resize_frames

# torchvision's RAFT is imported when the teacher is built (importing the package imports every target)

RAFT_VARIANTS = ("raft_large", "raft_small")
MIN_RAFT_SIDE = 128


def build_raft(variant: str, checkpoint: Union[str, os.PathLike]) -> torch.nn.Module:
    """torchvision RAFT of `variant` with the weights of a local torchvision-format state dict."""
    from torchvision.models import optical_flow

    if variant not in RAFT_VARIANTS:
        raise ValueError(f"unknown RAFT variant {variant!r}; one of {RAFT_VARIANTS}")
    model = getattr(optical_flow, variant)(weights=None, progress=False)
    load_strict(model, read_state_dict(checkpoint), f"{checkpoint} ({variant})")
    return model


@TARGETS.register("optical_flow")
class OpticalFlowTarget(Target):
    """RAFT flow t -> t+1 per pixel; pairs with too large motion and the last frame are invalid."""

    name = "optical_flow"

    def __init__(self, checkpoint: Union[str, os.PathLike], variant: str = "raft_large", iterations: int = 12,
                 max_flow: float = 50.0, scale: float = 1.0, loss: str = "l1", patch: int = 32):
        super().__init__(patch)
        self.variant, self.iterations, self.max_flow, self.scale = variant, iterations, max_flow, scale
        self.raft = build_raft(variant, checkpoint)
        self.spec = TargetSpec("dense", 2, loss)
        self.to(self.device, self.dtype)

    def teachers(self):
        return [self.raft]

    @classmethod
    def bench_variants(cls) -> Dict[str, Dict[str, Any]]:
        return {"optical_flow": {"variant": "raft_large"}, "optical_flow_small": {"variant": "raft_small"}}

    @classmethod
    def random_teacher(cls, root: Path, variant: str = "raft_large") -> Dict[str, Any]:
        from torchvision.models import optical_flow

        path = root / f"{variant}.safetensors"
        save_safetensors(getattr(optical_flow, variant)(weights=None, progress=False).state_dict(), path)
        return {"checkpoint": str(path), "variant": variant}

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        b, t, _, height, width = video.shape
        flow = video.new_zeros(b, t, 2, height, width)
        valid = torch.zeros(b, t, dtype=torch.bool, device=video.device)
        if t < 2:
            return TargetOutput(flow, valid)
        # torchvision's RAFT expects RGB in [-1, 1]
        frames = (to_unit_range(video.to(self.device, self.dtype)) * 2.0 - 1.0).clamp(-1.0, 1.0)
        first = frames[:, :-1].reshape(b * (t - 1), 3, height, width)
        second = frames[:, 1:].reshape(b * (t - 1), 3, height, width)
        # RAFT's 4-level correlation pyramid needs sides >= 128: smaller frames run upscaled and the
        # flow is brought back to the frame's pixel units
        size = tuple(max(s, MIN_RAFT_SIDE) for s in (height, width))
        if size != (height, width):
            first, second = resize_frames(first, size), resize_frames(second, size)
        # all pairs of all clips in one call: RAFT's cost is per pair, batching amortises the launches
        pairs = self.raft(first, second, num_flow_updates=self.iterations)[-1]
        if size != (height, width):
            pairs = F.interpolate(pairs.float(), size=(height, width), mode="bilinear", align_corners=False)
            pairs = pairs * torch.tensor([width / size[1], height / size[0]], device=pairs.device).view(1, 2, 1, 1)
        pairs = pairs.reshape(b, t - 1, 2, height, width).to(video.device, video.dtype)
        ok = pairs.abs().amax(dim=(2, 3, 4)) < self.max_flow
        flow[:, :-1] = torch.where(ok[:, :, None, None, None], pairs * self.scale, torch.zeros_like(pairs))
        valid[:, :-1] = ok.to(valid.device)
        return TargetOutput(flow, valid)
