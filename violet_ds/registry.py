"""Name -> factory registries for models, tasks and masked-visual-modeling targets."""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Iterable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """A named table of factories: ``@REG.register("name")`` then ``REG.create("name", **kw)``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            key = name or fn.__name__.replace("_", "-")
            if key in self._factories and self._factories[key] is not fn:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        try:
            return self._factories[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._factories, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._factories))}"
            ) from None

    def create(self, name: str, **kwargs):
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterable[str]:
        return iter(self.names())


MODELS = Registry("model")
TASKS = Registry("task")
TARGETS = Registry("MVM target")
