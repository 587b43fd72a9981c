"""The masked-visual-modeling (MVM) target interface shared by every target and the pretraining task.

A target turns the *unmasked*, ImageNet-normalised clip `(B, T, 3, H, W)` into what the MVM head must
predict, laid out on the video-transformer token grid `(T, h, w)` with `h = H / patch` (see
docs/architecture.md, "MVM targets"):

- `kind="dense"`:   `value (B, T, C, H, W)` per pixel; loss over the pixels of masked tokens;
- `kind="token"`:   `value long (B, T, h, w)` one class id per token; cross-entropy over masked tokens;
- `kind="feature"`: `value (B, T, h, w, C)` per token; regression over masked tokens.

Teachers (frozen networks some targets run) live in a plain attribute of the target object, which is
not an `nn.Module`: a task holding a target never registers the teacher as a submodule, so teacher
weights never reach the optimizer or a checkpoint. They run in eval mode, under `torch.no_grad`, in
the training dtype (`Target.to(device, dtype)`).

`TargetSpec` and `TargetOutput` are defined with the sidecar store (`violet_ds.data.sidecars`), which
keeps target values on disk; teachers read their weights through `violet_ds.weights`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from violet_ds.data.frames import IMAGENET_MEAN, IMAGENET_STD, to_unit_range
from violet_ds.data.sidecars import TargetOutput, TargetSpec
from violet_ds.registry import TARGETS


# ------------------------------------------------------------------------------------------ helpers

def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """`"bf16"`, `"bfloat16"`, `"fp16"`, `"float32"`, ... or a torch dtype -> torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
             "fp64": torch.float64, "float64": torch.float64}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}") from None


def renormalize(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ImageNet-normalised clip -> normalised with a teacher's own mean/std (e.g. CLIP's)."""
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return video
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=video.dtype, device=video.device).view(shape)
    std_t = torch.tensor(std, dtype=video.dtype, device=video.device).view(shape)
    return (to_unit_range(video) - mean_t) / std_t


def resize_frames(frames: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize float `(N, C, H, W)` to `size` (antialiased when shrinking); no-op when already that size."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    kwargs = {} if mode in ("nearest", "area") else {"align_corners": False}
    antialias = mode in ("bilinear", "bicubic") and (size[0] < frames.shape[-2] or size[1] < frames.shape[-1])
    if antialias:
        kwargs["antialias"] = True
    # float32: antialiased kernels have no bf16/fp16 CPU implementation, and resizing is cheap next to a teacher
    return F.interpolate(frames.float(), size=tuple(size), mode=mode, **kwargs).to(frames.dtype)


def pool_to_grid(features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Channels-last `(N, h', w', C)` teacher features -> `(N, h, w, C)` on the VT grid.

    Equal grids pass through; a finer teacher grid is average-pooled over the pixels each VT token
    covers (adaptive pooling); a coarser one is bilinearly upsampled.
    """
    if tuple(features.shape[1:3]) == tuple(grid):
        return features
    x = features.permute(0, 3, 1, 2)
    if features.shape[1] >= grid[0] and features.shape[2] >= grid[1]:
        x = F.adaptive_avg_pool2d(x.float(), grid).to(features.dtype)
    else:
        x = F.interpolate(x.float(), size=grid, mode="bilinear", align_corners=False).to(features.dtype)
    return x.permute(0, 2, 3, 1).contiguous()


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher never trains and never drops out."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def preprocessor_mean_std(model_dir: Union[str, os.PathLike], default_mean: Sequence[float],
                          default_std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """`image_mean`/`image_std` of a Hugging Face model folder's `preprocessor_config.json`, else the defaults."""
    config = Path(model_dir) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        mean, std = data.get("image_mean"), data.get("image_std")
        if mean is not None and std is not None:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return tuple(default_mean), tuple(default_std)


def check_video(video: torch.Tensor, patch: int) -> Tuple[int, int, int, int, int]:
    """Validate a clip `(B, T, 3, H, W)` whose sides are multiples of the VT patch; returns its shape."""
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"an MVM target needs a float clip (B, T, 3, H, W), got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"an MVM target needs the normalised float clip, got dtype {video.dtype} "
                         "(normalise with violet_ds.data.frames.normalize first)")
    b, t, _, height, width = video.shape
    if height % patch or width % patch:
        raise ValueError(f"frame size {height}x{width} is not a multiple of the VT patch {patch}")
    return b, t, 3, height, width


# ------------------------------------------------------------------------------------- the interface

class Target:
    """Base class of MVM targets. Not an `nn.Module` on purpose (see the module docstring).

    Subclasses set `spec` and implement `_compute(video) -> TargetOutput`; teachers are returned by
    `teachers()` and moved by `to()`.
    """

    name: str = "target"
    spec: TargetSpec
    patch: int = 32

    def __init__(self, patch: int = 32):
        self.patch = patch
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # teachers
    def teachers(self) -> List[nn.Module]:
        """The frozen networks this target runs (empty for pixel/HOG)."""
        return []

    def to(self, device: Union[str, torch.device, None] = None,
           dtype: Union[str, torch.dtype, None] = None) -> "Target":
        """Move teachers to `device` and cast them to the training `dtype`; returns self."""
        if device is not None:
            self.device = torch.device(device)
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            self.dtype = dtype
        for teacher in self.teachers():
            teacher.to(device=self.device, dtype=self._teacher_dtype())
            freeze(teacher)
        return self

    def _teacher_dtype(self) -> torch.dtype:
        return self.dtype

    # `violet-ds bench targets`
    @classmethod
    def bench_variants(cls) -> Dict[str, Dict[str, Any]]:
        """The rows `bench targets` times for this target: row name -> keyword arguments of `random_teacher`."""
        return {cls.name: {}}

    @classmethod
    def random_teacher(cls, root: Path, **variant) -> Dict[str, Any]:
        """Write the paper-sized teacher with random weights under `root`, in the teacher's real checkpoint
        format; returns the target options that load it (none for a target without a teacher)."""
        return {}

    # computation
    def grid(self, video: torch.Tensor) -> Tuple[int, int, int]:
        _, t, _, height, width = check_video(video, self.patch)
        return t, height // self.patch, width // self.patch

    def compute(self, video: torch.Tensor) -> TargetOutput:
        """The target of an unmasked normalised clip `(B, T, 3, H, W)`, never carrying gradients."""
        check_video(video, self.patch)
        for teacher in self.teachers():
            # a caller's model.train() never reaches the teacher, but a user may have toggled it
            if teacher.training:
                teacher.eval()
        with torch.no_grad():
            out = self._compute(video)
        self._check_output(out, video)
        return out

    __call__ = compute

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        raise NotImplementedError

    def expected_shape(self, video_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of `value` for a clip of shape `(B, T, 3, H, W)`."""
        b, t, _, height, width = video_shape
        h, w = height // self.patch, width // self.patch
        if self.spec.kind == "dense":
            return (b, t, self.spec.channels, height, width)
        if self.spec.kind == "token":
            return (b, t, h, w)
        return (b, t, h, w, self.spec.channels)

    def _check_output(self, out: TargetOutput, video: torch.Tensor) -> None:
        expected = self.expected_shape(video.shape)
        if tuple(out.value.shape) != expected:
            raise RuntimeError(f"target {self.name!r} produced shape {tuple(out.value.shape)}, expected {expected}")
        if out.valid is not None and tuple(out.valid.shape) != tuple(video.shape[:2]):
            raise RuntimeError(f"target {self.name!r} valid mask has shape {tuple(out.valid.shape)}, "
                               f"expected {tuple(video.shape[:2])}")

    def describe(self) -> Dict[str, Any]:
        """A JSON-friendly summary (name, spec, teacher parameter count) for logs and benchmarks."""
        params = sum(p.numel() for teacher in self.teachers() for p in teacher.parameters())
        return {"name": self.name, "kind": self.spec.kind, "channels": self.spec.channels,
                "loss": self.spec.loss, "teacher_params": params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec})"


# -------------------------------------------------------------------------------------------- loss

def _masked_mean(per_element: torch.Tensor, mask: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """Mean of `per_element` (the layout of the target's value) over the elements of masked tokens, from a
    weighted sum: no boolean selection, so no host sync (the element count stays on the device)."""
    if spec.kind == "dense":
        b, t, c, height, width = per_element.shape
        h, w = mask.shape[-2:]
        ph, pw = height // h, width // w
        if ph * h != height or pw * w != width:
            raise ValueError(f"dense target {height}x{width} is not a whole number of {h}x{w} tokens")
        # (B,T,C,h*ph,w*pw) -> (B,T,C,h,ph,w,pw), each token's pixels weighted by its mask entry
        weighted = per_element.view(b, t, c, h, ph, w, pw) * mask[:, :, None, :, None, :, None]
        per_token = c * ph * pw
    else:
        extra = per_element.dim() - 4  # feature channels (none for token ids)
        weighted = per_element * mask.view(*mask.shape, *([1] * extra))
        per_token = math.prod(per_element.shape[4:])
    return weighted.sum() / (mask.sum() * per_token).clamp(min=1)


def mvm_loss(pred: torch.Tensor, target: TargetOutput, token_mask: torch.Tensor,
             spec: TargetSpec) -> torch.Tensor:
    """The MVM loss averaged over the elements of masked (and valid) tokens only.

    `pred` has the layout of `target.value` (for `token`: logits `(B, T, h, w, classes)`);
    `token_mask` bool `(B, T, h, w)`, True = masked. Unmasked tokens get no gradient. With nothing
    masked the loss is a zero that keeps the graph (so every rank runs the same backward).
    """
    value = target.value
    if token_mask.dim() != 4:
        raise ValueError(f"token_mask must be (B, T, h, w), got shape {tuple(token_mask.shape)}")
    mask = token_mask.to(device=pred.device, dtype=torch.bool)
    if target.valid is not None:
        mask = mask & target.valid.to(device=pred.device, dtype=torch.bool)[:, :, None, None]
    if spec.kind == "token":
        if tuple(pred.shape[:-1]) != tuple(value.shape) or pred.shape[-1] != spec.channels:
            raise ValueError(f"token logits {tuple(pred.shape)} do not match target {tuple(value.shape)} "
                             f"x {spec.channels} classes")
    elif tuple(pred.shape) != tuple(value.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} does not match target {tuple(value.shape)}")
    if spec.kind != "dense" and tuple(mask.shape) != tuple(value.shape[:4]):
        raise ValueError(f"token_mask {tuple(mask.shape)} does not match the target grid {tuple(value.shape[:4])}")
    value = value.to(pred.device)
    if spec.loss == "cross_entropy":
        if spec.kind != "token":
            raise ValueError(f"cross_entropy scores token targets (one class id per token), not {spec.kind!r}")
        per_element = F.cross_entropy(pred.float().flatten(0, -2), value.long().flatten(),
                                      reduction="none").view(value.shape)
    else:
        regression = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "mse": F.mse_loss}[spec.loss]
        per_element = regression(pred.float(), value.float(), reduction="none")
    return _masked_mean(per_element, mask, spec)


# --------------------------------------------------------------------------------- factory and mix

def _ensure_registered() -> None:
    # importing the package registers every target module (imported here: the package imports this module)
    import violet_ds.targets  # noqa: F401


def create_target(name: str, **options) -> Target:
    """Build a registered target by name (`pixel`, `hog`, `optical_flow`, `depth`, `vq`, `2d_feature`,
    `2d_clip_feature`, `3d_feature`) with its options (checkpoint paths etc.)."""
    _ensure_registered()
    return TARGETS.create(name, **options)


def list_targets() -> List[str]:
    _ensure_registered()
    return TARGETS.names()


@dataclass
class MixEntry:
    name: str
    weight: float
    target: Target


@dataclass
class TargetMix:
    """Several targets with loss weights; total MVM loss = sum(weight * mvm_loss)."""

    entries: List[MixEntry] = field(default_factory=list)

    def __iter__(self) -> Iterator[MixEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> Target:
        for entry in self.entries:
            if entry.name == name:
                return entry.target
        raise KeyError(f"no target {name!r} in the mix ({', '.join(self.names())})")

    def names(self) -> List[str]:
        return [entry.name for entry in self.entries]

    @property
    def specs(self) -> Dict[str, TargetSpec]:
        return {entry.name: entry.target.spec for entry in self.entries}

    @property
    def weights(self) -> Dict[str, float]:
        return {entry.name: entry.weight for entry in self.entries}

    def teachers(self) -> List[nn.Module]:
        return [teacher for entry in self.entries for teacher in entry.target.teachers()]

    def to(self, device=None, dtype=None) -> "TargetMix":
        for entry in self.entries:
            entry.target.to(device, dtype)
        return self

    def compute(self, video: torch.Tensor, batch: Optional[Mapping[str, Any]] = None) -> Dict[str, TargetOutput]:
        """Every target of the clip; pre-extracted ones are taken from `batch` (see `target_from_batch`)."""
        out = {}
        for entry in self.entries:
            given = target_from_batch(entry.name, entry.target.spec, batch, single=len(self.entries) == 1)
            out[entry.name] = given if given is not None else entry.target.compute(video)
        return out

    def loss(self, preds: Mapping[str, torch.Tensor], outputs: Mapping[str, TargetOutput],
             token_mask: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(weighted total, {name: unweighted loss}) over the masked tokens."""
        parts = {}
        total = None
        for entry in self.entries:
            part = mvm_loss(preds[entry.name], outputs[entry.name], token_mask, entry.target.spec)
            parts[entry.name] = part
            total = part * entry.weight if total is None else total + part * entry.weight
        return total, parts


MixSpec = Union[str, Sequence[str], Mapping[str, float]]


def create_targets(weights: MixSpec, options: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   patch: Optional[int] = None) -> TargetMix:
    """A weighted mix: `create_targets({"pixel": 1.0, "hog": 0.5}, {"hog": {"orientations": 9}})`.

    `weights` may also be one name or a list of names (weight 1 each); a target of weight 0 is left
    out (its teacher is never built). `options[name]` are the keyword arguments of that target's
    factory; `patch`, when given, is every target's VT patch unless its options set one.
    """
    if isinstance(weights, str):
        weights = {weights: 1.0}
    elif not isinstance(weights, Mapping):
        weights = {name: 1.0 for name in weights}
    options = dict(options or {})
    unknown = sorted(set(options) - set(weights))
    if unknown:
        raise KeyError(f"options given for targets not in the mix: {unknown}")
    if not weights:
        raise ValueError("an MVM target mix needs at least one target")
    entries = []
    for name, weight in weights.items():
        if float(weight) < 0:
            raise ValueError(f"MVM target {name!r} has a negative weight {weight}")
        if float(weight) == 0:
            continue
        target_options = dict(options.get(name, {}))
        if patch is not None:
            target_options.setdefault("patch", patch)
        entries.append(MixEntry(name, float(weight), create_target(name, **target_options)))
    return TargetMix(entries)


def target_from_batch(name: str, spec: TargetSpec, batch: Optional[Mapping[str, Any]],
                      single: bool = True) -> Optional[TargetOutput]:
    """A pre-extracted target carried by the batch, or None.

    Keys: `mvm_target:<name>` (+ `mvm_target_valid:<name>`); for a single-target run also
    `mvm_target` (+ `mvm_target_valid`); for `vq` also the VIOLET-style `vq_tokens (B, T, h, w)`.
    """
    if not batch:
        return None
    for key, valid_key in ((f"mvm_target:{name}", f"mvm_target_valid:{name}"),
                           ("mvm_target", "mvm_target_valid")):
        if key == "mvm_target" and not single:
            continue
        if key in batch and batch[key] is not None:
            return TargetOutput(batch[key], batch.get(valid_key))
    if spec.kind == "token" and name == "vq" and batch.get("vq_tokens") is not None:
        return TargetOutput(batch["vq_tokens"].long(), None)
    return None


def load_hf_model(model_cls, model_dir: Union[str, os.PathLike]) -> nn.Module:
    """A transformers model from a local folder (`save_pretrained` layout); never touches the hub."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass a local folder written by save_pretrained "
                                "(weights are never downloaded at run time)")
    return model_cls.from_pretrained(str(path), local_files_only=True)
