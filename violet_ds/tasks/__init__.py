"""Tasks: one `nn.Module` per training objective, registered in `violet_ds.registry.TASKS`.

Every module in this package is imported here (found with pkgutil), so adding a task is adding a
file: its `@TASKS.register(...)` runs when `violet_ds.tasks` is imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from violet_ds.registry import TASKS

_LOADED = []
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
        _LOADED.append(_module.name)


def create_task(name: str, model, cfg, tokenizer):
    """Build the registered task `name` around `model` (see docs/architecture.md, "Tasks")."""
    return TASKS.create(name, model=model, cfg=cfg, tokenizer=tokenizer)


def list_tasks() -> list[str]:
    return TASKS.names()


__all__ = ["create_task", "list_tasks", "TASKS"]
