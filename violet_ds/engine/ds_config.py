"""The resolved DeepSpeed config of a run: the JSON file named by `engine.ds_config`, `engine.ds_overrides`
applied, every "auto" field filled from the run config, and the settings whose DeepSpeed defaults bite
(gradient clipping, the bf16 overflow scan, ZeRO-2 overlap) written explicitly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config import DataConfig, EngineConfig, OptimConfig
from .distributed import World
from .optim import optimizer_kind, skips_nonfinite_on_device

AUTO = "auto"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def find_ds_config(path: str) -> Path:
    """The DeepSpeed JSON that `engine.ds_config` names.

    A bare name (`zero2_bf16`, `cpu_test.json`) is a packaged config (`violet_ds/ds_configs/`), never a file of
    the working directory; a path with a folder is the user's file, and a missing one falls back to the
    packaged config of that file name (`ds_configs/cpu_test.json` as older configs wrote it).
    """
    from violet_ds import resources

    candidate = Path(path).expanduser()
    bare = candidate.parent == Path(".") and not str(path).startswith(".")
    packaged = resources.find_ds_config(path)
    if bare and packaged is not None:
        return packaged
    if candidate.is_file():
        return candidate
    if packaged is not None:
        return packaged
    raise FileNotFoundError(f"DeepSpeed config {path!r} not found: not a file, and not one of the packaged "
                            f"configs ({', '.join(resources.ds_config_names())})")


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
    if cfg["bf16"].get("check_grad_overflow", AUTO) in (AUTO, None):
        # DeepSpeed's bf16 overflow check scans every gradient (13 ops per parameter, about 7k per violet-v2 step,
        # and a host sync) to skip a step with inf/NaN gradients. torch's fused AdamW skips such a step on the
        # device instead (deepspeed_engine.skip_nonfinite_steps reads the global gradient norm DeepSpeed computes
        # anyway), so the scan is off with it; other optimizers keep it
        cfg["bf16"]["check_grad_overflow"] = not skips_nonfinite_on_device(optimizer_kind(optim, optimizer_offloaded(cfg)))
    if precision == "bf16" and not cfg["bf16"]["check_grad_overflow"] and cfg["gradient_clipping"] > 0 and \
            skips_nonfinite_on_device(optimizer_kind(optim, optimizer_offloaded(cfg))):
        # and the clipping with it: DeepSpeed's reads its norm on the host once per parameter group (4 syncs per
        # step); the fused kernel divides the gradients by the clip factor on the device (`grad_scale`)
        cfg["gradient_clipping"] = 0.0
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
