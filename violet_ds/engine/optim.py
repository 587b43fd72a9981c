"""The optimizer DeepSpeed is handed: AdamW parameter groups, the optimizer implementation and the LR schedule."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable

import torch
from torch import nn

from ..config import OptimConfig


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # biases and LayerNorm/BatchNorm scales are the rank-1 tensors; decaying them only hurts
    return param.ndim <= 1 or name.endswith(".bias")


def parameter_groups(module: nn.Module, optim: OptimConfig,
                     frozen: Iterable[nn.Module] = ()) -> list[dict]:
    """AdamW groups: {decay, no decay} x {video encoder (lr x video_lr_mult), rest}.

    Parameters that do not require grad (and anything inside `frozen` teacher modules) are left out.
    """
    frozen_ids = {id(p) for teacher in frozen for p in teacher.parameters()}
    groups: Dict[tuple, dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in frozen_ids:
            continue
        no_decay = optim.no_decay_bias_norm and _is_no_decay(name, param)
        video = any(name.startswith(prefix) for prefix in optim.video_param_prefixes)
        key = (video, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [], "names": [],
                "weight_decay": 0.0 if no_decay else optim.weight_decay,
                "lr": optim.lr * (optim.video_lr_mult if video else 1.0),
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError("the task has no trainable parameters")
    out = []
    for (video, no_decay), group in sorted(groups.items()):
        group["group_name"] = f"{'video' if video else 'main'}_{'no_decay' if no_decay else 'decay'}"
        names = group.pop("names")
        group["num_params"] = sum(p.numel() for p in group["params"])
        group["first_names"] = names[:3]
        out.append(group)
    return out


def optimizer_kind(optim: OptimConfig, offloaded: bool = False) -> str:
    """The optimizer `optim.optimizer` resolves to ("auto": torch's fused AdamW, DeepSpeed's CPU Adam when the
    optimizer state is offloaded)."""
    if optim.optimizer == "auto":
        # torch's fused AdamW (one multi-tensor kernel per step, no JIT build) on GPU and CPU alike; DeepSpeed's
        # FusedAdam needs an nvcc build at first use (see tools/gpu_check.sh for both timed)
        return "deepspeed_cpu_adam" if offloaded else "adamw"
    return optim.optimizer


def skips_nonfinite_on_device(kind: str) -> bool:
    """Whether the optimizer `kind` can skip a step on the device (torch's fused AdamW reads a `found_inf` tensor,
    as it does under a GradScaler): then `deepspeed_engine.skip_nonfinite_steps` replaces DeepSpeed's bf16
    per-gradient overflow scan (ds_config.py turns the scan off)."""
    return kind == "adamw" and "fused" in inspect.signature(torch.optim.AdamW).parameters


def build_optimizer(groups: list[dict], optim: OptimConfig, device: torch.device,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """The client optimizer handed to DeepSpeed (see OptimConfig.optimizer)."""
    kind = optimizer_kind(optim, offloaded)
    if kind.startswith("deepspeed_"):
        _deepspeed_friendly_arch_list()
    clean = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")} for g in groups]
    common = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if kind == "adamw":
        # fused on CPU too: one `_fused_adamw_` op per step (foreach: a dozen `_foreach_*` ops), and the only
        # implementation that honours `found_inf` (the on-device skip of a non-finite step)
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(clean, **common, **({"fused": True} if fused_ok else {"foreach": True}))
    if kind == "deepspeed_fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(clean, adam_w_mode=True, **common)
    if kind == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, adamw_mode=True, **common)
    if kind == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
        except ImportError:
            raise ImportError("optim.optimizer=apex_fused_adam needs NVIDIA apex built from source "
                              "(github.com/NVIDIA/apex); PyPI's 'apex' is an unrelated package") from None
        return ApexFusedAdam(clean, adam_w_mode=True, **common)
    raise ValueError(f"unknown optimizer {kind!r}")


def _deepspeed_friendly_arch_list() -> None:
    """DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST as plain "major.minor" numbers; CUDA images
    often set arch-specific entries such as "9.0a", which it cannot parse (ValueError '0a'). Its ops need
    no arch-specific instructions, so drop the suffix."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return
    entries = [e for e in value.replace(" ", ";").split(";") if e]
    fixed = []
    for entry in entries:
        ptx = entry.endswith("+PTX")
        number = entry[:-4] if ptx else entry
        number = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        number = number + "+PTX" if ptx else number
        if number not in fixed:
            fixed.append(number)
    if fixed != entries:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(fixed)


class WarmupDecay:
    """LR multiplier: linear warm-up to 1, then linear/cosine decay to `min_ratio` at `total` steps.

    A class (not a lambda) so that LambdaLR's state_dict can carry it into checkpoints.
    """

    def __init__(self, total: int, warmup: int, schedule: str = "linear", min_ratio: float = 0.0):
        self.total, self.warmup, self.schedule, self.min_ratio = max(1, total), max(0, warmup), schedule, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(total_steps, warmup, optim.schedule, optim.min_lr_ratio))


# ----------------------------------------------------------------------------------------- resume
GROUP_SETTINGS = ("weight_decay", "betas", "eps")
"""AdamW settings of a parameter group that the run's config decides (a checkpoint's are replaced on resume)"""


def _plain(value):
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class OptimizerSettings:
    """What a run's configuration decides about every optimizer step still to come: the peak LR of each
    parameter group, the `WarmupDecay` shape (total steps, warm-up, schedule, floor) and AdamW's settings.
    The optimizer's moments and the step count are not settings: they come from a checkpoint."""

    base_lrs: tuple
    shape: tuple
    """sorted (field, value) pairs of the schedule's multiplier"""
    groups: tuple
    """per parameter group, sorted (key, value) pairs of GROUP_SETTINGS"""


def optimizer_settings(scheduler) -> OptimizerSettings:
    """The settings `scheduler` (a LambdaLR over one multiplier, as `build_scheduler` makes) and its optimizer hold."""
    shape = scheduler.lr_lambdas[0]
    return OptimizerSettings(
        base_lrs=tuple(float(lr) for lr in scheduler.base_lrs),
        shape=tuple(sorted((key, _plain(value)) for key, value in vars(shape).items())),
        groups=tuple(tuple(sorted((key, _plain(group[key])) for key in GROUP_SETTINGS if key in group))
                     for group in scheduler.optimizer.param_groups))


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_changes(old: OptimizerSettings, new: OptimizerSettings) -> list[str]:
    """One "what: old -> new" per setting that differs, named by the config options that decide it."""
    changes = []
    if old.base_lrs != new.base_lrs:
        same_ratios = len(old.base_lrs) == len(new.base_lrs) and all(
            math.isclose(o * new.base_lrs[0], n * old.base_lrs[0], rel_tol=1e-9)
            for o, n in zip(old.base_lrs, new.base_lrs))
        if same_ratios:
            changes.append(f"optim.lr {_number(max(old.base_lrs))} -> {_number(max(new.base_lrs))}")
        else:
            changes.append("peak lr per parameter group (optim.lr, optim.video_lr_mult) "
                           f"[{', '.join(map(_number, old.base_lrs))}] -> [{', '.join(map(_number, new.base_lrs))}]")
    names = {"total": "total steps (run.max_steps / run.epochs)",
             "warmup": "warm-up steps (optim.warmup_steps / optim.warmup_ratio)",
             "schedule": "optim.schedule", "min_ratio": "optim.min_lr_ratio"}
    before, after = dict(old.shape), dict(new.shape)
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes.append(f"{names.get(key, key)} {_number(before.get(key))} -> {_number(after.get(key))}")
    for key in GROUP_SETTINGS:
        values = [{k: v for k, v in group}.get(key) for group in old.groups]
        wanted = [{k: v for k, v in group}.get(key) for group in new.groups]
        if values != wanted:
            # weight decay: the decayed groups carry optim.weight_decay, the others 0
            pick = max if key == "weight_decay" else (lambda items: items[0])
            changes.append(f"optim.{key} {_number(pick(values))} -> {_number(pick(wanted))}")
    return changes


def apply_settings(scheduler, settings: OptimizerSettings) -> list[str]:
    """Make a scheduler loaded from a checkpoint follow `settings` (the current config's) from its own step on.

    The LR of every later step is then the current schedule's at that step: a larger total continues the
    decay at a non-zero LR, a new peak LR scales it, a new warm-up or schedule shape takes over. Returns
    `describe_changes` of the loaded settings; with none, nothing is touched (an exact resume stays bitwise).
    """
    loaded = optimizer_settings(scheduler)
    if loaded == settings:
        return []
    changes = describe_changes(loaded, settings)
    groups = scheduler.optimizer.param_groups
    lr_before = float(groups[0]["lr"])
    shape = scheduler.lr_lambdas[0]
    vars(shape).update({key: value for key, value in settings.shape})
    scheduler.base_lrs = list(settings.base_lrs)
    for group, base_lr, extra in zip(groups, settings.base_lrs, settings.groups):
        group.update({key: (tuple(value) if key == "betas" else value) for key, value in extra})
        group["initial_lr"] = base_lr
        # LambdaLR's own formula at the step it stands on
        group["lr"] = base_lr * shape(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    if float(groups[0]["lr"]) != lr_before:
        changes.append(f"lr of the next step {_number(lr_before)} -> {_number(float(groups[0]['lr']))}")
    return changes
