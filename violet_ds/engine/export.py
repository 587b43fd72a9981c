"""Consolidated task weights out of a DeepSpeed (ZeRO) checkpoint, and `read_weights`, the one entry through
which weights reach violet_ds (`model.weights`, `run.init_from`, `from_pretrained`, `load_run`, `predict`): a run,
checkpoints or tag directory, a model directory, a `.safetensors` file or an official .pt. The `violet-ds export`
command that writes them to files is `violet_ds.commands.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from violet_ds.models.checkpoint_io import read_weights_file
from violet_ds.weights import MODEL_DIR_WEIGHTS, Weights, check_finite

from . import checkpoint as ckpt
from .checkpoint import COMPLETE_MARKER
from .logging import library_output, library_progress


def locate_checkpoint(path: str | Path, tag: Optional[str] = None) -> Tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir or a tag dir (+ optional tag)."""
    return ckpt.locate(path, tag)


def require_complete(checkpoint_dir: Path, tag: str) -> None:
    """A tag zero_to_fp32 can consolidate: its completion marker, and one ZeRO optimizer partition (which hold the
    fp32 weights) per rank of the world that saved it; else a CheckpointError naming the tag and the complete ones."""
    tag_dir = Path(checkpoint_dir) / tag
    others = ", ".join(t for t in ckpt.complete_tags(checkpoint_dir) if t != tag)
    use = f"use a complete tag ({others})" if others else f"{checkpoint_dir} holds no other complete tag"
    marker = tag_dir / COMPLETE_MARKER
    if not marker.is_file():
        raise ckpt.CheckpointError(f"checkpoint {tag_dir} is incomplete: no {COMPLETE_MARKER} (its save was "
                                   f"interrupted); {use}")
    try:
        world_size = int(json.loads(marker.read_text()).get("world_size") or 1)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        raise ckpt.CheckpointError(f"{marker}: unreadable (not the JSON a finished save writes); the tag is "
                                   f"damaged; {use}") from None
    partitions = list(tag_dir.glob("*optim_states.pt"))
    if len(partitions) < world_size:
        raise ckpt.CheckpointError(
            f"checkpoint {tag_dir} is incomplete: {len(partitions)} of the {world_size} ZeRO optimizer partitions "
            f"(*_optim_states.pt, which hold the fp32 weights) are there (files were removed or not copied); {use}")


def deepspeed_fp32_state_dict(path: str | Path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a (ZeRO-partitioned) checkpoint, through DeepSpeed's zero_to_fp32.

    zero_to_fp32's reports (it prints them) go to the library log (`logging.library_output`), its
    progress through `violet_ds.progress` (a bar on terminals, dated lines elsewhere)."""
    checkpoint_dir, tag = locate_checkpoint(path, tag)
    require_complete(checkpoint_dir, tag)
    # zero_to_fp32 unpickles without limits: every file is checked first
    ckpt.check_tag_dir(checkpoint_dir / tag)
    with library_output("zero_to_fp32"):  # imported inside: what the import prints goes to the library log
        from deepspeed.utils import zero_to_fp32

        with library_progress(zero_to_fp32, "zero_to_fp32"):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    state = {key: value.detach().float().contiguous() if value.is_floating_point() else value.contiguous()
             for key, value in state.items()}
    others = [t for t in ckpt.complete_tags(checkpoint_dir) if t != tag]
    check_finite(state, f"checkpoint {checkpoint_dir / tag}",
                 hint=f"use an earlier tag ({', '.join(others) or 'none saved'})")
    return state


def weights_source(path: str | Path, tag: Optional[str] = None) -> str:
    """What `read_weights` finds at `path`: "deepspeed" (a run directory, its checkpoints/ directory or a tag
    directory), "model_dir" (config.json + model.safetensors, from `violet-ds export --format dir`) or "file"
    (a violet_ds .safetensors or an official checkpoint). Raises FileNotFoundError naming every accepted kind."""
    path = Path(path)
    if path.is_file():
        return "file"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / MODEL_DIR_WEIGHTS).is_file():
        return "model_dir"
    try:
        ckpt.locate(path, tag)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no weights found there; expected a run directory (its `latest` checkpoint), its checkpoints/ "
            f"directory or one tag directory, a model directory (config.json + {MODEL_DIR_WEIGHTS}, from "
            "`violet-ds export --format dir`), a .safetensors file or an official checkpoint (.pt)"
            + (f"; tag {tag!r} not found" if tag else "")) from None
    return "deepspeed"


def read_weights(source: str | Path, tag: Optional[str] = None) -> Weights:
    """The weights at `source` and what they were: a run directory (its `latest` tag), its checkpoints/ directory
    or a tag directory ("deepspeed": consolidated fp32, `tag` picks one), a model directory ("model_dir"), a
    violet_ds `.safetensors` ("safetensors"), an official VIOLET / VIOLETv2 / LAVENDER checkpoint ("official":
    mapped to `model.*` / `heads.*` names, its frozen teachers dropped) or another torch file ("torch"). Every
    tensor is finite (`weights.check_finite`); FileNotFoundError names every accepted kind."""
    path = Path(source)
    if weights_source(path, tag) != "deepspeed":
        return read_weights_file(path)
    checkpoint_dir, tag = locate_checkpoint(path, tag)
    return Weights(deepspeed_fp32_state_dict(checkpoint_dir, tag), "deepspeed", checkpoint_dir / tag)
