"""Evaluation loop shared by every task, and the cross-rank gathering tasks use in `evaluate_end`."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from .distributed import World
from violet_ds.progress import progress as show_progress
from violet_ds.progress import quiet as quiet_progress


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def merge_outputs(outputs: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Concatenate a list of per-batch dicts: tensors along dim 0 (on CPU), lists extended."""
    merged: Dict[str, List[Any]] = {}
    for output in outputs:
        for key, value in output.items():
            merged.setdefault(key, []).append(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    result: Dict[str, Any] = {}
    for key, values in merged.items():
        if all(isinstance(v, torch.Tensor) for v in values):
            result[key] = torch.cat([v.reshape(1) if v.dim() == 0 else v for v in values])
        else:
            flat: List[Any] = []
            for value in values:
                flat.extend(value if isinstance(value, (list, tuple)) else [value])
            result[key] = flat
    return result


def gather_outputs(outputs: Iterable[Mapping[str, Any]], world: World) -> Dict[str, Any]:
    """Merge this rank's per-batch outputs and all-gather them across ranks.

    When outputs carry `index` (the dataset index), samples that a distributed sampler padded in
    twice are dropped, so each sample is counted exactly once; rows are returned sorted by index.
    """
    local = merge_outputs(outputs)
    if world.distributed and torch.distributed.is_initialized():
        parts: List[Optional[Dict[str, Any]]] = [None] * world.world_size
        torch.distributed.all_gather_object(parts, local)
        local = merge_outputs([p for p in parts if p])
    index = local.get("index")
    if isinstance(index, torch.Tensor) and index.numel():
        order = torch.argsort(index, stable=True)
        sorted_index = index[order]
        first = torch.ones_like(sorted_index, dtype=torch.bool)
        first[1:] = sorted_index[1:] != sorted_index[:-1]
        keep = order[first]
        count = index.numel()
        for key, value in list(local.items()):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == count:
                local[key] = value[keep]
            elif isinstance(value, list) and len(value) == count:
                local[key] = [value[i] for i in keep.tolist()]
    return local


@torch.no_grad()
def evaluate(task: torch.nn.Module, loaders: Mapping[str, Any], world: World, *,
             max_batches: Optional[int] = None, progress: bool = False) -> Dict[str, float]:
    """Run a task's evaluation over `loaders` ({name: DataLoader}); returns metrics (same on every rank).

    A task whose `evaluate_full(loaders, world, max_batches=None)` returns metrics evaluates itself
    (e.g. full retrieval matrices; `max_batches` caps the batches it reads from each loader, as for
    step-wise evaluation); when it returns None each loader goes through `evaluate_step` and the list
    of outputs to `evaluate_end` (the task contract: `violet_ds.tasks.base.Task`).
    Metrics of loaders other than the first are prefixed with the loader name.
    """
    was_training = task.training
    task.eval()
    shown = progress and world.is_main
    # evaluation must not shift the training RNG streams (exact resume depends on it); progress (the task's
    # own loops included) is shown on the main rank when asked for
    with torch.random.fork_rng(devices=[]), (contextlib.nullcontext() if shown else quiet_progress()):
        try:
            full = task.evaluate_full(dict(loaders), world, max_batches=max_batches)
            if full is not None:
                return {k: float(v) for k, v in full.items()}
            metrics: Dict[str, float] = {}
            for position, (name, loader) in enumerate(loaders.items()):
                outputs = []
                total = len(loader) if max_batches is None else min(len(loader), max_batches)
                # a bar on terminals, dated lines elsewhere: carriage-return redraws do not belong in log files
                bar = show_progress(total=total, desc=f"eval {name}", unit="batch", leave=False)
                for number, batch in enumerate(loader):
                    if max_batches is not None and number >= max_batches:
                        break
                    outputs.append(task.evaluate_step(to_device(batch, world.device)))
                    bar.update(1)
                bar.close()
                result = task.evaluate_end(outputs, world)
                prefix = "" if position == 0 else f"{name}/"
                metrics.update({f"{prefix}{k}": float(v) for k, v in result.items()})
            return metrics
        finally:
            task.train(was_training)
