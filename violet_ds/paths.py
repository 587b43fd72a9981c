"""Portable run directories: the paths of a run's configuration, made absolute and re-rooted.

A training run records its configuration (`config.yaml`) with every file path absolute (data shards and
annotations, tokenizer, initial weights, the run's own `run.output_dir`, a user's DeepSpeed JSON; a packaged
DeepSpeed config stays a name), so the run directory works from any working directory. When the run
directory is moved together with its data, a recorded path that no longer exists is looked up at the same
place relative to the run directory (`/old/runs/demo` + `/old/data/x.tsv` -> `/new/runs/demo/../../data/x.tsv`).
Configurations written with relative paths (by older versions) are read relative to the directory they
were started from, inferred from `run.output_dir`/`run.name`.

The functions take the configuration as a dict of sections (`{"model": {...}, "data": {...}}`) or of the
config dataclasses (`{"model": ModelConfig, ...}`); both are changed in place.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import yaml

from violet_ds.config import deprecated_keys, upgrade_deprecated_keys
from violet_ds.errors import UserError
from violet_ds.resources import close_recipes, find_ds_config, find_recipe

# dotted keys holding one path (or a comma-separated list of paths)
PATH_KEYS = ("model.weights", "model.pretrained_swin", "model.text_config_dir", "data.tokenizer", "run.init_from",
             "run.output_dir", "engine.ds_config")
# keys of every data source (data.train[], data.val[], data.test[]) holding paths, globs or comma-separated lists
SOURCE_KEYS = ("tsv", "annotations", "vq", "targets")
SPLITS = ("train", "val", "test")
CONFIG_FILE = "config.yaml"


def _get(holder: Any, key: str) -> Any:
    return holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)


def _set(holder: Any, key: str, value: Any) -> None:
    if isinstance(holder, dict):
        holder[key] = value
    else:
        setattr(holder, key, value)


def _slots(config: Any) -> Iterator[Tuple[Any, str]]:
    """(holder, key) of every path-valued field present in `config`."""
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        holder = _get(config, section)
        if holder is not None:
            yield holder, key
    data = _get(config, "data")
    for split in SPLITS:
        for source in (_get(data, split) or []) if data is not None else []:
            for key in SOURCE_KEYS:
                yield source, key


def _is_packaged_ds_config(key: str, value: str) -> bool:
    return key == "ds_config" and Path(value).parent == Path(".") and find_ds_config(value) is not None


def _map_paths(config: Any, fn: Callable[[str], str]) -> None:
    for holder, key in _slots(config):
        value = _get(holder, key)
        if not isinstance(value, str) or not value.strip() or _is_packaged_ds_config(key, value):
            continue
        _set(holder, key, ",".join(fn(part.strip()) if part.strip() else part for part in value.split(",")))


def make_absolute(config: Any, base: Optional[Path] = None) -> Any:
    """Every relative path of `config` made absolute against `base` (default: the working directory)."""
    base = Path(base or os.getcwd())
    _map_paths(config, lambda part: os.path.normpath(base / os.path.expanduser(part)))
    return config


def exists(path: str) -> bool:
    """A file or folder, or a glob that matches something."""
    return bool(glob.glob(path)) if glob.has_magic(path) else os.path.exists(path)


def recorded_run_dir(config: Any) -> Optional[Path]:
    """The run directory a configuration names (`run.output_dir`/`run.name`), as recorded."""
    run = _get(config, "run")
    if run is None or not _get(run, "name"):
        return None
    return Path(str(_get(run, "output_dir") or "runs")) / str(_get(run, "name"))


def started_in(config: Any, run_dir: Path) -> Path:
    """The directory a run with relative paths was started from: `run_dir` less its recorded relative
    `output_dir/name` (a recorded absolute run directory: the current one's parent chain is not needed)."""
    recorded = recorded_run_dir(config)
    run_dir = Path(run_dir).resolve()
    if recorded is None or recorded.is_absolute() or ".." in recorded.parts:
        return Path(os.getcwd())
    parents = len(recorded.parts)
    return run_dir.parents[parents - 1] if len(run_dir.parents) >= parents else Path(os.getcwd())


def relocate(config: Any, run_dir: Path) -> Any:
    """`config` of the run now at `run_dir`: relative paths read from where the run was started; recorded
    paths that no longer exist re-rooted at the same place relative to the run directory (when that
    exists); `run.output_dir` / `run.name` naming `run_dir`."""
    run_dir = Path(run_dir).resolve()
    recorded = recorded_run_dir(config)
    if recorded is not None and not recorded.is_absolute():
        make_absolute(config, started_in(config, run_dir))
        recorded = recorded_run_dir(config)

    def moved(part: str) -> str:
        if recorded is None or exists(part) or not os.path.isabs(part):
            return part
        candidate = os.path.normpath(run_dir / os.path.relpath(part, recorded))
        return candidate if exists(candidate) else part

    _map_paths(config, moved)
    run = _get(config, "run")
    if run is not None:
        _set(run, "output_dir", str(run_dir.parent))
        _set(run, "name", run_dir.name)
    return config


def _key_at(text: str, line: int, column: int) -> Optional[str]:
    """The dotted key (`model.name`, `data.train[0].tsv`) of the YAML value that starts at line/column
    (0-based), found on the composed node tree (no value is constructed); None where there is none."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None

    def walk(node: Any, key: str) -> Optional[str]:
        if (node.start_mark.line, node.start_mark.column) == (line, column):
            return key or None
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [(f"{key}.{name.value}" if key else str(name.value), value) for name, value in node.value]
            children += [(key, name) for name, _ in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(f"{key}[{number}]", item) for number, item in enumerate(node.value)]
        for child_key, child in children:
            found = walk(child, child_key)
            if found:
                return found
        return None

    return walk(root, "") if root is not None else None


def load_yaml_file(path: Path) -> Any:
    """A YAML file of plain values (`yaml.safe_load`): a syntax error or a tag (`!!python/object...`: violet_ds
    never constructs objects from a file) is one ValueError naming the file, the line and the key."""
    path = Path(path)
    text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "somewhere"
        key = _key_at(text, mark.line, mark.column) if mark is not None else None
        where = f"{line}, key {key}" if key else line
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        tag = re.search(r"tag '([^']+)'", problem)
        if isinstance(error, yaml.constructor.ConstructorError) and tag:
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise ValueError(f"{path}: {where}: the YAML tag {name} is refused (violet_ds reads plain values "
                             "only and constructs no object from a file); remove the tag") from None
        raise ValueError(f"{path}: not valid YAML at {where} ({problem})") from None


def read_run_config(run_dir: str | Path) -> dict:
    """A run directory's `config.yaml` as a dict of sections, relocated to where the run directory is now."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} (not a violet_ds run directory)")
    config = load_yaml_file(path) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, data, task, ...)")
    return relocate(upgrade_deprecated_keys(config, str(path)), Path(run_dir))


def run_config_header(command: str, when: str) -> str:
    """The comment line at the top of a run's config.yaml."""
    return f"# violet-ds {command}: the resolved configuration, started in {os.getcwd()} at {when}\n"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / "checkpoints").is_dir()


def config_argument(value: str) -> str:
    """What `--config VALUE` loads, as jsonargparse takes it (a file path or YAML text).

    - a run directory, or its `config.yaml`: that run's configuration with its paths as they are now
      (`read_run_config`), so `--config RUN_DIR --run.resume auto` continues a run from anywhere, moved or not;
    - any other existing file: itself, once it reads as plain YAML (`load_yaml_file`);
    - otherwise a packaged recipe (`violet-ds recipes`), with or without `.yaml`.
    """
    path = Path(value).expanduser()
    if path.is_dir() and is_run_dir(path):
        return yaml.safe_dump(read_run_config(path), sort_keys=False)
    if path.is_file() and path.name == CONFIG_FILE and is_run_dir(path.parent):
        return yaml.safe_dump(read_run_config(path.parent), sort_keys=False)
    if path.is_file():
        config = load_yaml_file(path)  # a syntax error or a YAML tag: named here with its file, line and key
        if deprecated_keys(config):
            return yaml.safe_dump(upgrade_deprecated_keys(config, str(path)), sort_keys=False)
        return value
    if path.is_dir():
        raise UserError(f"--config {value}: a folder without {CONFIG_FILE} and checkpoints/ (not a run directory)")
    recipe = find_recipe(value)
    if recipe is not None:
        return str(recipe)
    close = close_recipes(value)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"--config {value}: no such file, run directory or packaged recipe{hint} "
                    "(`violet-ds recipes` lists the recipes)")
