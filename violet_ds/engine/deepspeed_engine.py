"""The DeepSpeed engine of a run: `deepspeed.initialize` with our parameter groups, optimizer and LR
schedule (`optim.py`) on the resolved ds_config (`ds_config.py`), and the engine readings the trainer
logs (loss scale, gradient norm). Checkpoints are `checkpoint.py`'s.
"""

from __future__ import annotations

import types
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
    lighten_zero_bookkeeping(optimizer)
    # ds_config.py hands the clipping to the fused kernel (DeepSpeed's `gradient_clipping` 0) when it turns the scan off
    clip = optim.grad_clip if not ds_config.get("gradient_clipping") else 0.0
    engine.nonfinite_skip = skip_nonfinite_steps(optimizer, client, clip)
    return engine, optimizer, scheduler, groups


def lighten_zero_bookkeeping(zero_optimizer) -> bool:
    """Fewer ops per parameter tensor in the backward and step of DeepSpeed's ZeRO-1/2 optimizer, same results.

    Attributes of this one optimizer instance are replaced (DeepSpeed's class and other instances are untouched);
    together -5.96k aten ops per violet-v2 bf16 step, 544 parameter tensors (docs/benchmarks.md):

    - `get_grad_norm_direct` (the gradient norm of a parameter group): one `torch._foreach_norm` over the group's
      gradients in place of a detach, a dtype copy and a `linalg_vector_norm` per gradient. The same per-tensor
      norms in the same dtype (bitwise on the CPU; CUDA's fused kernel may sum in another order), then DeepSpeed's
      own sum, all-reduce, root and inf/NaN masking; the infinity norm keeps DeepSpeed's code.
    - `_update_model_bit16_weights` (after every step: each bit16 parameter re-pointed into the group's flat buffer,
      4 ops per tensor): skipped for a group whose parameters all still alias their slice of that buffer, which
      they do after every step (the all-gather writes into the buffer in place); DeepSpeed's re-pointing runs as
      before whenever one does not (a buffer moved by `offload_states` / `reload_states`, a parameter replaced).
    - `flatten` / `unflatten` (torch's `_flatten_dense_tensors` / `_unflatten_dense_tensors`, attributes DeepSpeed
      itself swaps for ZenFlow): the gradients of a reduction bucket and of the step's partition flattened in one
      `_chunk_cat` (a view per tensor before), the reduced bucket split in one `split_with_sizes` (a slice per
      tensor before); the same copies and views.
    - With the optimizer offloaded (`offload_optimizer`), the two host reads per parameter tensor DeepSpeed makes
      (about 1.1k for violet-v2) become one per step: the inf/NaN test of each gradient as it is copied to host
      memory (`update_offload_overflow_tracker`) accumulates on the device and is read once, by the overflow check
      that reads it anyway (`has_overflow`); the group's norm (`complete_grad_norm_calculation_for_cpu_offload`, a
      `.item()` per gradient) is summed on the device from the same per-gradient norms.

    Returns whether `zero_optimizer` is one of those optimizers (False: nothing changed)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        return False
    if not getattr(zero_optimizer, "zenflow", False) and hasattr(torch, "_chunk_cat"):
        zero_optimizer.flatten = flatten_dense_tensors
        zero_optimizer.unflatten = unflatten_dense_tensors
    zero_optimizer.get_grad_norm_direct = types.MethodType(_foreach_grad_norm_direct, zero_optimizer)
    zero_optimizer._update_model_bit16_weights = types.MethodType(_update_moved_bit16_weights, zero_optimizer)
    if zero_optimizer.cpu_offload:
        zero_optimizer.update_offload_overflow_tracker = types.MethodType(_offload_overflow_on_device, zero_optimizer)
        zero_optimizer.has_overflow = types.MethodType(_offload_has_overflow, zero_optimizer)
        zero_optimizer.complete_grad_norm_calculation_for_cpu_offload = types.MethodType(_offload_grad_norm,
                                                                                         zero_optimizer)
    return True


def flatten_dense_tensors(tensors) -> torch.Tensor:
    """torch's `_flatten_dense_tensors` (a new 1-D tensor, the tensors' elements one after the other) in one
    `_chunk_cat` where it can (two or more non-empty tensors of one dtype and device, none 0-dim)."""
    from torch._utils import _flatten_dense_tensors

    tensors = list(tensors)
    # one tensor: torch returns a view of it, not a copy (callers reduce it in place)
    if len(tensors) < 2 or any(t.dim() == 0 or t.numel() == 0 for t in tensors) or \
            len({(t.dtype, t.device) for t in tensors}) != 1:
        return _flatten_dense_tensors(tensors)
    return torch._chunk_cat(tensors, 0, 1).view(-1)


def unflatten_dense_tensors(flat: torch.Tensor, tensors) -> list:
    """torch's `_unflatten_dense_tensors` (views of `flat` shaped as `tensors`) with one `split_with_sizes` for
    their slices (a `narrow` each before)."""
    from torch._utils import _unflatten_dense_tensors

    tensors = list(tensors)
    sizes = [t.numel() for t in tensors]
    if not sizes or 0 in sizes or flat.dim() != 1 or sum(sizes) > flat.numel():
        # torch gives an empty tensor its own storage
        return _unflatten_dense_tensors(flat, tensors)
    rest = flat.numel() - sum(sizes)
    parts = torch.split_with_sizes(flat, sizes + [rest] if rest else sizes)
    return [part.view(t.shape) for part, t in zip(parts, tensors)]


def _foreach_grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct with the per-gradient norms in one `_foreach_norm`."""
    from deepspeed import comm as dist
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0:
        return DeepSpeedZeroOptimizer.get_grad_norm_direct(self, gradients, params, norm_type)
    # DeepSpeed's selection: no alignment padding, no pipeline replica, model-parallel duplicates on rank 0 only
    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    kept = [g for g, p in zip(grads, params)
            if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
            and (ds_utils.is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
    if kept:
        # the norm of each gradient upcast to get_norm_dtype(), as DeepSpeed's `vector_norm(g.to(dtype))`
        norms = torch._foreach_norm(kept, 2.0, dtype=get_norm_dtype())
        total_norm = torch.stack(norms).pow(2.0).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    total_norm = total_norm.pow(1.0 / 2.0)
    ds_utils.mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def _offload_overflow_on_device(self, grad) -> None:
    """DeepSpeedZeroOptimizer.update_offload_overflow_tracker without a host read per gradient: `local_overflow`
    (False after every step) becomes DeepSpeed's own inf/NaN test of each gradient or-ed on the device, a 0-dim bool
    tensor that `has_overflow` (`_offload_has_overflow`) reads once."""
    if grad is None:
        return
    found = self._has_inf_or_nan(grad.data)
    previous = self.local_overflow
    if isinstance(previous, bool):
        self.local_overflow = found.logical_or(torch.tensor(previous, device=found.device))
    else:
        self.local_overflow = previous.logical_or(found)


def _offload_has_overflow(self, partition_gradients=True) -> bool:
    """DeepSpeedZeroOptimizer.has_overflow with the optimizer offloaded, reading the device flag
    `_offload_overflow_on_device` keeps: DeepSpeed's max all-reduce over data- and model-parallel ranks, one host
    read."""
    from deepspeed import comm as dist

    flag = self.local_overflow
    flag = flag if isinstance(flag, torch.Tensor) else torch.tensor(bool(flag))
    overflow = flag.to(device=self.device, dtype=torch.uint8).reshape(1)
    dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=overflow, op=dist.ReduceOp.MAX)
    return bool(overflow[0].item())


def _offload_grad_norm(self, params):
    """DeepSpeedZeroOptimizer.complete_grad_norm_calculation_for_cpu_offload with the per-gradient norms
    (`norm_for_param_grads`, computed by DeepSpeed as the gradients are copied to host memory) summed on the device:
    squares in float64 as DeepSpeed's Python floats, the sum in one `cumsum` (sequential on the CPU, as DeepSpeed's
    loop), then DeepSpeed's float32 all-reduce, root and -1 for a non-finite norm; no `.item()` per gradient."""
    from deepspeed import comm as dist
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED

    norms = []
    for p in params:
        if hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue
        if ds_utils.is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
            param_id = self.get_param_id(p)
            if param_id in self.norm_for_param_grads:
                norms.append(self.norm_for_param_grads[param_id])
            elif not self.ignore_unused_parameters:
                raise AssertionError(f"parameter {param_id} has no gradient: it was not used to compute the loss "
                                     "(zero_optimization.ignore_unused_parameters allows that)")
    if norms:
        squares = torch.stack([n.reshape(()) for n in norms]).to(device=self.device, dtype=torch.float64).square()
        total = squares.cumsum(0)[-1].float().reshape(1)
    else:
        total = torch.zeros(1, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    norm = total[0].double().sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, -1.0)).float()


def _aliases(tensor: torch.Tensor, flat: torch.Tensor, offset: int, shape) -> bool:
    """Whether `tensor` is the contiguous slice `flat[offset:offset + numel].view(shape)` (no aten op: `.data` or a
    view would dispatch one)."""
    return (tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            and tensor.storage_offset() == flat.storage_offset() + offset and tensor.shape == shape
            and tensor.dtype == flat.dtype and tensor.is_contiguous())


def _update_moved_bit16_weights(self, group_index):
    """DeepSpeedZeroOptimizer._update_model_bit16_weights, run only when a parameter of the group does not alias its
    slice of the group's flat bit16 buffer."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    flat = self.bit16_groups_flat[group_index]
    ordered = self.round_robin_bit16_groups[group_index]
    in_place = all(_aliases(p, flat, offset, meta.shape) for p, meta, offset in
                   zip(ordered, self.round_robin_bit16_meta[group_index], self.round_robin_bit16_offsets[group_index]))
    # the model's parameters are the round-robin list's, reordered
    in_place = in_place and all(param is ordered[new_index] for param, new_index in
                                zip(self.bit16_groups[group_index], self.round_robin_bit16_indices[group_index]))
    if not in_place:
        DeepSpeedZeroOptimizer._update_model_bit16_weights(self, group_index)


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
