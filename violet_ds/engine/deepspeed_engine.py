"""The DeepSpeed engine of a run: `deepspeed.initialize` with our parameter groups, optimizer and LR
schedule (`optim.py`) on the resolved ds_config (`ds_config.py`), and the engine readings the trainer
logs (loss scale, gradient norm). Checkpoints are `checkpoint.py`'s.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from violet_ds.errors import UserError

from ..config import OptimConfig
from .distributed import World
from .ds_config import optimizer_offloaded
from .logging import OwnScalarsMonitor, library_output
from .optim import build_optimizer, build_scheduler, parameter_groups


def require_monitor_packages(ds_config: dict) -> None:
    """A monitor block of the ds_config whose package is missing fails here, in one line (DeepSpeed's own
    check prints a hint to stdout and raises a bare ImportError from inside `deepspeed.initialize`)."""
    if not (ds_config.get("wandb") or {}).get("enabled"):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("the ds_config's wandb block is enabled but wandb is not installed: "
                        "pip install 'violet-ds[wandb]' (or drop the block)") from None


def initialize(task: nn.Module, ds_config: dict, optim: OptimConfig, total_steps: int, world: World,
               frozen: Iterable[nn.Module] = ()):
    """deepspeed.initialize with our optimizer, groups and schedule -> (engine, optimizer, scheduler, groups).

    What DeepSpeed prints meanwhile (op builds, its info lines) goes to the run's log (`library_output`);
    its monitors get TensorBoard's scalars without DeepSpeed's duplicates (`OwnScalarsMonitor`)."""
    require_monitor_packages(ds_config)
    frozen = list(frozen)
    task_param_ids = {id(p) for p in task.parameters()}
    leaked = [type(m).__name__ for m in frozen if any(id(p) in task_param_ids for p in m.parameters())]
    if leaked:
        raise ValueError(f"frozen teacher modules {leaked} are registered inside the task; keep teachers "
                         "outside the task module so they stay out of the optimizer and checkpoints")
    groups = parameter_groups(task, optim, frozen)
    with library_output("deepspeed"):
        import deepspeed

        optimizer = build_optimizer(groups, optim, world.device, optimizer_offloaded(ds_config))
        scheduler = build_scheduler(optimizer, optim, total_steps)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=task, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
    if getattr(engine, "monitor", None) is not None:
        engine.monitor = OwnScalarsMonitor(engine.monitor)
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
