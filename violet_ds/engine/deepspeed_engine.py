"""The DeepSpeed engine of a run: `deepspeed.initialize` with our parameter groups, optimizer and LR
schedule (`optim.py`) on the resolved ds_config (`ds_config.py`), and the engine readings the trainer
logs (loss scale, gradient norm). Checkpoints are `checkpoint.py`'s.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..config import OptimConfig
from .distributed import World
from .ds_config import optimizer_offloaded
from .optim import build_optimizer, build_scheduler, parameter_groups


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
