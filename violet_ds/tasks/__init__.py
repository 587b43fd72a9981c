"""Tasks: one `nn.Module` per training objective, registered in `violet_ds.registry.TASKS`.

The contract every task follows is `violet_ds.tasks.base.Task`. Every module of this package is
imported here, so adding a task is adding a file: its `@TASKS.register(...)` runs on import.
"""

from __future__ import annotations

from violet_ds.registry import TASKS, import_submodules

from .base import Task

import_submodules(__name__)


def create_task(name: str, model, cfg, tokenizer, *, tie_mlm_head: bool = False, clip=None) -> Task:
    """Build the registered task `name` around `model` (see `Task` and docs/architecture.md, "Tasks").

    `tie_mlm_head` (the run's `model.tie_mlm_head`) ties an MLM head's decoder to the word embeddings;
    `clip`: a model directory's clip settings (`Task.clip`).
    """
    return TASKS.create(name, model=model, cfg=cfg, tokenizer=tokenizer, tie_mlm_head=tie_mlm_head, clip=clip)


def list_tasks() -> list[str]:
    return TASKS.names()


__all__ = ["create_task", "list_tasks", "Task", "TASKS"]
