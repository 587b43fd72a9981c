"""Files that ship inside the package: training recipes (`violet_ds/recipes/*.yaml`) and DeepSpeed configs
(`violet_ds/ds_configs/*.json`).

They are found next to this module, never through the working directory, so an installed copy has them
wherever it runs. `--config NAME` (a recipe name, with or without `.yaml`) and `engine.ds_config: NAME`
(a DeepSpeed config name, with or without `.json`) resolve here when NAME is not an existing file.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
DS_CONFIGS_DIR = PACKAGE_DIR / "ds_configs"


def _packaged(folder: Path, name: str, suffix: str) -> Optional[Path]:
    """`folder/<stem>suffix` for a bare name or file name (a name with a directory part is looked up by its
    file name, so the repository-relative `ds_configs/cpu_test.json` of older configs still resolves)."""
    stem = Path(name).name
    if stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    if not stem:
        return None
    candidate = folder / f"{stem}{suffix}"
    return candidate if candidate.is_file() else None


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def ds_config_names() -> list[str]:
    return sorted(path.stem for path in DS_CONFIGS_DIR.glob("*.json"))


def find_recipe(name: str) -> Optional[Path]:
    """The packaged recipe `name` (`pretrain_demo` or `pretrain_demo.yaml`), or None."""
    return _packaged(RECIPES_DIR, name, ".yaml")


def find_ds_config(name: str) -> Optional[Path]:
    """The packaged DeepSpeed config `name` (`cpu_test`, `cpu_test.json` or `ds_configs/cpu_test.json`), or None."""
    return _packaged(DS_CONFIGS_DIR, name, ".json")


def close_recipes(name: str) -> list[str]:
    return difflib.get_close_matches(Path(name).stem, recipe_names(), n=3, cutoff=0.5)


@dataclass(frozen=True)
class RecipeInfo:
    """What `violet-ds recipes` lists about one recipe."""

    name: str
    summary: str
    model: str
    task: str
    path: Path


def _summary(text: str) -> str:
    """The recipe's first comment sentence (its header says what it trains)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    header = re.sub(r"\s*\(`violet-ds [^`]*`\)", "", " ".join(lines))
    depth, end = 0, len(header)
    for i, char in enumerate(header):  # the first sentence: up to ". " or "; " outside parentheses
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ".;" and header[i + 1:i + 2] in (" ", ""):
            end = i
            break
    sentence = header[:end]
    return sentence if len(sentence) <= 90 else sentence[:87].rstrip() + "..."


def recipe_info(path: Path) -> RecipeInfo:
    text = path.read_text()
    config = yaml.safe_load(text) or {}
    model = (config.get("model") or {}).get("name", "violet-tiny")
    task_cfg = config.get("task") or {}
    task = str(task_cfg.get("name", "pretrain"))
    if task_cfg.get("head_style") == "mlm":
        task += " (mlm)"
    return RecipeInfo(name=path.stem, summary=_summary(text), model=str(model), task=task, path=path)


def list_recipes() -> list[RecipeInfo]:
    return [recipe_info(RECIPES_DIR / f"{name}.yaml") for name in recipe_names()]
