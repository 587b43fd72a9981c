"""`violet-ds recipes`: the training recipes that ship inside the package.

`violet-ds recipes` lists them; `violet-ds recipes show NAME` prints one, to copy and edit. Any training
command takes `--config NAME` for a packaged recipe (a NAME that is not an existing file).
"""

from __future__ import annotations

from typing import Optional

from ..errors import UserError
from ..resources import close_recipes, find_recipe, list_recipes


def recipes(show: Optional[str] = None) -> None:
    """List the packaged training recipes (name, what it trains, model, task), or print one of them.

    `violet-ds pretrain --config pretrain_demo` runs a listed recipe; `violet-ds recipes show pretrain_demo
    > my.yaml` copies one to edit. Data paths inside a recipe are relative to the directory you run in.

    Args:
        show: print this recipe (`violet-ds recipes show NAME` is the same).
    """
    if show is not None:
        path = find_recipe(show)
        if path is None:
            close = close_recipes(show)
            hint = f" (did you mean: {', '.join(close)}?)" if close else ""
            raise UserError(f"no packaged recipe {show!r}{hint}; `violet-ds recipes` lists them")
        print(path.read_text(), end="")
        return
    infos = list_recipes()
    name_w = max(len(info.name) for info in infos)
    model_w = max(len(info.model) for info in infos)
    task_w = max(len(info.task) for info in infos)
    print(f"{'recipe':<{name_w}}  {'model':<{model_w}}  {'task':<{task_w}}  what it trains")
    for info in infos:
        print(f"{info.name:<{name_w}}  {info.model:<{model_w}}  {info.task:<{task_w}}  {info.summary}")
    print(f"\n{len(infos)} recipes. Run one: violet-ds pretrain|finetune --config NAME; "
          "print one to edit: violet-ds recipes show NAME")
