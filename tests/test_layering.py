"""The floors of docs/architecture.md hold: no module imports a module of a higher floor.

Top to bottom: the CLI, commands and benchmarks (with predict, pretrained), tasks, engine, targets, models, data,
then the bottom floor (masking, metrics, config, registry, weights, progress, errors). The engine and
the tasks are siblings in spirit (neither knows the other); the engine sits below so that a task may
name an engine type for documentation without the engine ever importing a task.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "violet_ds"
FLOORS = {
    "cli": 8, "commands": 8, "bench": 8, "predict": 8, "pretrained": 7,
    "tasks": 6, "engine": 5, "targets": 4, "models": 3, "data": 2,
    "masking": 1, "metrics": 1, "config": 1, "registry": 1, "weights": 1, "progress": 1,
    "paths": 1, "errors": 0, "resources": 0,
}


def _part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def _imports(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, name) for line, name in found if name.startswith("violet_ds.")]


def test_no_module_imports_a_higher_floor():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if me == "__init__":  # the package's public facade re-exports from every floor
            continue
        assert me in FLOORS, f"{path}: add its floor to FLOORS (and to docs/architecture.md)"
        for line, name in _imports(path):
            other = _part(name)
            if other != me and FLOORS.get(other, 0) > FLOORS[me]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a data module importing a task is reported."""
    fake = tmp_path / "violet_ds" / "data"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from violet_ds.tasks import create_task\nfrom ..engine import trainer\n")
    names = [name for _, name in _imports(fake / "bad.py", tmp_path / "violet_ds")]
    assert names == ["violet_ds.tasks", "violet_ds.engine"]
    assert all(FLOORS[_part(name)] > FLOORS["data"] for name in names)
