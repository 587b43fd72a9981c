"""`violet-ds export`: a DeepSpeed (ZeRO) checkpoint -> one safetensors file of fp32 task weights, or a
model directory.

The file holds the task's keys (`model.*` backbone, `heads.*`), loadable by
`violet_ds.models.create_model(name, weights=file)` (backbone) and by `--run.init_from file` (all).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import torch

from violet_ds.engine.checkpoint import DIVERGED_NOTE
from violet_ds.engine.export import deepspeed_fp32_state_dict, locate_checkpoint
from violet_ds.paths import load_yaml_file
from violet_ds.pretrained import export_dir
from violet_ds.weights import save_safetensors


def model_name_of(checkpoint_dir: Path, tag: str) -> Optional[str]:
    """The model name recorded in the run's resolved config (client state is not needed for this)."""
    for candidate in (checkpoint_dir.parent / "config.yaml",):
        if candidate.is_file():
            config = load_yaml_file(candidate) or {}
            name = (config.get("model") or {}).get("name")
            if name:
                return str(name)
    return None


def _warn_if_diverged(checkpoint: str, tag: Optional[str]) -> None:
    """A tag the divergence guard marked (its weights produced a non-finite loss) is exported with a warning."""
    checkpoint_dir, tag = locate_checkpoint(checkpoint, tag)
    if (checkpoint_dir / tag / DIVERGED_NOTE).is_file():
        print(f"warning: {checkpoint_dir / tag} is marked diverged ({DIVERGED_NOTE}): the loss went non-finite "
              "right after it, so these weights may give NaN outputs", file=sys.stderr, flush=True)


def export(checkpoint: str, output: Optional[str] = None, tag: Optional[str] = None,
           dtype: str = "fp32", backbone_only: bool = False,
           format: Literal["safetensors", "dir"] = "safetensors", tokenizer: Optional[str] = None) -> None:
    """Export a DeepSpeed training checkpoint to one safetensors file of consolidated weights, or to a
    model directory (`--format dir`: config.json, model.safetensors, tokenizer files, README model card).

    Args:
        checkpoint: a run directory (runs/NAME), its checkpoints/ directory, or one tag directory.
        output: the .safetensors file to write (default: <run dir>/export/<tag>.safetensors).
        tag: checkpoint tag (default: the one `latest` names).
        dtype: fp32 (default), bf16 or fp16 for the floating-point tensors.
        backbone_only: keep only `model.*` keys (drop task heads).
        format: `safetensors` (one file) or `dir` (a model directory that `violet_ds.from_pretrained`,
            `run.init_from` and `violet-ds predict` load; default output <run dir>/export/<tag>/).
        tokenizer: with --format dir: the tokenizer directory to ship (default: the run's `data.tokenizer`).
    """
    _warn_if_diverged(checkpoint, tag)
    if format == "dir":
        if backbone_only:
            raise ValueError("--backbone_only applies to --format safetensors (a model directory holds the task)")
        export_dir(checkpoint, output, tag, dtype, tokenizer=tokenizer)
        return None

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    checkpoint_dir, tag = locate_checkpoint(checkpoint, tag)
    state = deepspeed_fp32_state_dict(checkpoint_dir / tag)
    if backbone_only:
        state = {k: v for k, v in state.items() if k.startswith("model.")}
    state = {k: v.to(dtypes[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(output) if output else checkpoint_dir.parent / "export" / f"{tag}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "violet_ds", "source": str(checkpoint_dir / tag), "tag": tag, "dtype": dtype}
    model_name = model_name_of(checkpoint_dir, tag)
    if model_name:
        metadata["model_name"] = model_name
    save_safetensors(state, out, metadata=metadata)
    params = sum(v.numel() for v in state.values())
    print(f"exported {checkpoint_dir / tag} -> {out}\n  {len(state)} tensors, {params / 1e6:.2f}M values, {dtype}"
          + (f", model {model_name} (create_model({model_name!r}, weights={str(out)!r}))" if model_name else ""),
          flush=True)
    (out.with_suffix(".json")).write_text(json.dumps({**metadata, "tensors": len(state), "values": params}, indent=2))
