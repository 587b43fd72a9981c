"""DeepSpeed plumbing: the resolved ds_config, optimizer + parameter groups, LR schedule, initialize,
and (re-exported from engine/checkpoint.py) the checkpoint functions.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from ..config import DataConfig, EngineConfig, OptimConfig
from .distributed import World

AUTO = "auto"


# ----------------------------------------------------------------------------------------- ds_config
def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def find_ds_config(path: str) -> Path:
    """A ds_config path as given, else relative to the repository's `ds_configs/` folder."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    packaged = Path(__file__).resolve().parents[2] / "ds_configs" / candidate.name
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(f"DeepSpeed config {path!r} not found (also looked for {packaged})")


def _fill(section: dict, key: str, value: Any, where: str) -> None:
    """Set an "auto" (or missing) field; an explicit value that disagrees with the run config is an error."""
    current = section.get(key, AUTO)
    if current == AUTO or current is None:
        section[key] = value
    elif current != value:
        raise ValueError(f"ds_config {where}{key}={current!r} contradicts the run config ({value!r}); "
                         f"set it to \"auto\" or change the run config")


def resolve_ds_config(engine: EngineConfig, optim: OptimConfig, data: DataConfig, world: World) -> dict:
    """Load `engine.ds_config`, apply `engine.ds_overrides`, fill every "auto" field from the run config."""
    path = find_ds_config(engine.ds_config)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    cfg = _merge(cfg, engine.ds_overrides)
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(f"{path}: remove the 'optimizer'/'scheduler' blocks; violet_ds builds both from "
                         "the `optim` section of the run config")
    _fill(cfg, "train_micro_batch_size_per_gpu", data.batch_size, "")
    _fill(cfg, "gradient_accumulation_steps", engine.grad_accum, "")
    _fill(cfg, "train_batch_size", data.batch_size * engine.grad_accum * world.world_size, "")
    # DeepSpeed's default clip is 1.0 whatever the user meant: always write ours
    _fill(cfg, "gradient_clipping", float(optim.grad_clip), "")
    precision = engine.precision
    if precision == "auto":
        if cfg.get("bf16", {}).get("enabled") in (True, AUTO):
            precision = "bf16"
        elif cfg.get("fp16", {}).get("enabled") in (True, AUTO):
            precision = "fp16"
        else:
            precision = "fp32"
    cfg.setdefault("bf16", {})
    cfg.setdefault("fp16", {})
    cfg["bf16"]["enabled"] = precision == "bf16"
    cfg["fp16"]["enabled"] = precision == "fp16"
    if precision == "bf16":
        # DeepSpeed >= 0.19.3 skips bf16 steps with inf/nan gradients silently; keep it explicit
        cfg["bf16"].setdefault("check_grad_overflow", True)
    zero = cfg.setdefault("zero_optimization", {})
    if engine.zero_stage is not None:
        zero["stage"] = engine.zero_stage
    zero.setdefault("stage", 2)
    if zero["stage"] == 2:
        # ZeRO-2 only overlaps the gradient reduction with backward when asked to
        zero.setdefault("overlap_comm", True)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 2**31 - 1)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def precision_of(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def optimizer_offloaded(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


# ----------------------------------------------------------------------------------------- optimizer
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


def build_optimizer(groups: list[dict], optim: OptimConfig, device: torch.device,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """The client optimizer handed to DeepSpeed (see OptimConfig.optimizer)."""
    kind = optim.optimizer
    if kind == "auto":
        # torch's fused AdamW (one multi-tensor CUDA kernel, no JIT build) on GPU and CPU alike;
        # DeepSpeed's FusedAdam needs an nvcc build at first use (see tools/gpu_check.sh for both timed)
        kind = "deepspeed_cpu_adam" if offloaded else "adamw"
    if kind.startswith("deepspeed_"):
        _deepspeed_friendly_arch_list()
    clean = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")} for g in groups]
    common = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if kind == "adamw":
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(clean, **common, **({"fused": True} if fused_ok else {}))
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


def initialize(task: nn.Module, ds_config: dict, optim: OptimConfig, total_steps: int, world: World,
               frozen: Iterable[nn.Module] = ()):
    """deepspeed.initialize with our optimizer, groups and schedule -> (engine, optimizer, scheduler, groups)."""
    import deepspeed

    frozen = list(frozen)
    task_param_ids = {id(p) for p in task.parameters()}
    leaked = [type(m).__name__ for m in frozen if any(id(p) in task_param_ids for p in m.parameters())]
    if leaked:
        raise ValueError(f"frozen teacher modules {leaked} are registered inside the task; keep teachers "
                         "outside the task module so they stay out of the optimizer and checkpoints")
    groups = parameter_groups(task, optim, frozen)
    optimizer = build_optimizer(groups, optim, world.device, optimizer_offloaded(ds_config))
    scheduler = build_scheduler(optimizer, optim, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False)
    return engine, optimizer, scheduler, groups


def loss_scale(engine) -> float:
    """Current dynamic loss scale (fp16), 1.0 otherwise."""
    optimizer = engine.optimizer
    for attribute in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, torch.Tensor):
            return float(value.item())
    return 1.0


def grad_norm(engine) -> Optional[float]:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


# ----------------------------------------------------------------------------------------- checkpoints
# checkpoint state has one owner, violet_ds.engine.checkpoint; these names stay importable from here
from .checkpoint import (  # noqa: E402,F401
    COMPLETE_MARKER, LATEST_FILE, checkpoint_tag, complete_tags, load_checkpoint, prune_checkpoints,
    resolve_resume_tag, rng_state, save_checkpoint, set_rng_state,
)
