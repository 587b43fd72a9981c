"""Name -> factory registries for models, tasks and masked-visual-modeling targets.

Each of the packages `violet_ds.models`, `violet_ds.tasks` and `violet_ds.targets` ends its
`__init__` with `import_submodules(__name__)`: every module in the package is imported, so its
`@REGISTRY.register(...)` lines run. A new model, task or target is therefore one new file.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Dict, Iterable, List, TypeVar

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

    def add(self, name: str, factory: F, doc: str) -> F:
        """Register a factory made in a loop (one per variant), named after the variant for help and errors."""
        factory.__name__ = name.replace("-", "_")
        factory.__doc__ = doc
        return self.register(name)(factory)

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


def import_submodules(package: str) -> List[str]:
    """Import every module of `package` (a package's `__name__`) whose name does not start with `_`.

    Modules are imported in name order, over every folder of the package's `__path__`; a module
    already imported is not run again. Returns the module names found.
    """
    # a package importing itself gets its partly initialised module back from sys.modules
    path = importlib.import_module(package).__path__
    names = sorted({info.name for info in pkgutil.iter_modules(path) if not info.name.startswith("_")})
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
