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

        client = build_optimizer(groups, optim, world.device, optimizer_offloaded(ds_config))
        scheduler = build_scheduler(client, optim, total_steps)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=task, optimizer=client, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
    if getattr(engine, "monitor", None) is not None:
        engine.monitor = OwnScalarsMonitor(engine.monitor)
    # ds_config.py hands the clipping to the fused kernel (DeepSpeed's `gradient_clipping` 0) when it turns the scan off
    clip = optim.grad_clip if not ds_config.get("gradient_clipping") else 0.0
    engine.nonfinite_skip = skip_nonfinite_steps(optimizer, client, clip)
    return engine, optimizer, scheduler, groups


class NonFiniteSkip:
    """Skips, on the device, every optimizer step whose global gradient norm is inf or NaN (and clips by it).

    DeepSpeed's ZeRO / bf16 optimizers compute the global gradient norm before they call the client optimizer; a
    step pre-hook turns it into `found_inf` (1.0 when not finite), which torch's fused AdamW reads as it does under
    a GradScaler: parameters, moments and the step count stay as they were. With `max_norm` > 0 the hook also sets
    `grad_scale` to DeepSpeed's clip factor max(1, (norm + 1e-6) / max_norm), by which the kernel divides the
    gradients. A few small ops per step and no host sync, in place of DeepSpeed's bf16 scan of every gradient
    (`bf16.check_grad_overflow`, 13 ops per parameter and a host read) and its clipping (a host read of the norm
    per parameter group). `skipped` counts the skipped steps on the device (read it where the host syncs anyway).
    A NaN gradient never reaches the weights; the learning-rate schedule still advances by one step."""

    def __init__(self, zero_optimizer, client: torch.optim.Optimizer, max_norm: float = 0.0):
        self.zero_optimizer = zero_optimizer
        self.client = client
        self.max_norm = float(max_norm)
        self.skipped: Optional[torch.Tensor] = None
        self._norm: Optional[torch.Tensor] = None
        self.handle = client.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        norm = getattr(self.zero_optimizer, "_global_grad_norm", None)
        if not isinstance(norm, torch.Tensor):
            # no norm this step (`compute_grad_norm: false`): nothing to check or clip by
            optimizer.found_inf = optimizer.grad_scale = None
            return
        if norm is not self._norm:  # ZeRO steps its parameter groups one by one: one flag per step
            self._norm = norm
            norm = norm.to(torch.float32)
            bad = (~torch.isfinite(norm)).to(torch.float32)
            self.skipped = bad if self.skipped is None else self.skipped + bad
            optimizer.found_inf = bad
            optimizer.grad_scale = ((norm + 1e-6) / self.max_norm).clamp_min(1.0) if self.max_norm > 0 else None

    def remove(self) -> None:
        self.handle.remove()
        self.client.found_inf = self.client.grad_scale = None

    def skipped_steps(self) -> int:
        """Steps skipped so far (one host read)."""
        return 0 if self.skipped is None else int(self.skipped.item())


def skip_nonfinite_steps(zero_optimizer, client: torch.optim.Optimizer,
                         max_norm: float = 0.0) -> Optional[NonFiniteSkip]:
    """A :class:`NonFiniteSkip` on `client` (clipping to `max_norm` when > 0) when it is torch's fused AdamW (None
    otherwise: DeepSpeed's own checks and clipping stay in charge, see ds_config.py)."""
    if isinstance(client, torch.optim.AdamW) and client.defaults.get("fused"):
        return NonFiniteSkip(zero_optimizer, client, max_norm)
    if max_norm > 0:
        raise ValueError("the ds_config leaves gradient clipping to torch's fused AdamW, which this run does not use")
    return None


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


def skipped_steps(engine) -> int:
    """Optimizer steps skipped in this process: DeepSpeed's own (fp16 overflow, the bf16 scan) plus those whose
    gradient norm was not finite under `NonFiniteSkip` (one host read; call it where the loop syncs anyway)."""
    own = engine.nonfinite_skip
    return int(engine.skipped_steps) + (own.skipped_steps() if own is not None else 0)


def grad_norm(engine) -> Optional[float]:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)
