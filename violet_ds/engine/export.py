"""Consolidated task weights out of a DeepSpeed (ZeRO) checkpoint, and the one reader of task weights
for `run.init_from` (run dir, model dir, safetensors, official .pt). The `violet-ds export` command that
writes them to files is `violet_ds.commands.export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .checkpoint import COMPLETE_MARKER
from .logging import library_output, library_progress



def locate_checkpoint(path: str | Path, tag: Optional[str] = None) -> Tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir or a tag dir (+ optional tag)."""
    return ckpt.locate(path, tag)


def deepspeed_fp32_state_dict(path: str | Path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a (ZeRO-partitioned) checkpoint, through DeepSpeed's zero_to_fp32.

    zero_to_fp32's reports (it prints them) go to the library log (`logging.library_output`), its
    progress through `violet_ds.progress` (a bar on terminals, dated lines elsewhere)."""
    checkpoint_dir, tag = locate_checkpoint(path, tag)
    if not (checkpoint_dir / tag / COMPLETE_MARKER).is_file():
        raise RuntimeError(f"checkpoint {checkpoint_dir / tag} is incomplete (its save was interrupted)")
    # zero_to_fp32 unpickles without limits: every file is checked first
    ckpt.check_tag_dir(checkpoint_dir / tag)
    with library_output("zero_to_fp32"):
        from deepspeed.utils import zero_to_fp32

        with library_progress(zero_to_fp32, "zero_to_fp32"):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    return {key: value.detach().float().contiguous() if value.is_floating_point() else value.contiguous()
            for key, value in state.items()}


def read_weights(path: str | Path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Task weights from a run/checkpoint dir (DeepSpeed), a model directory, a violet_ds safetensors,
    or an official .pt (mapped to `model.*` / `heads.*` names, its frozen teachers dropped)."""
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").is_file():
        return deepspeed_fp32_state_dict(path, tag)
    from violet_ds.models.checkpoint_io import read_violet_state_dict

    return read_violet_state_dict(path)
