"""Make a run's checkpoint loadable on a different number of ranks (`violet-ds universal-checkpoint`).

A ZeRO-2 checkpoint is cut into one optimizer shard per data-parallel rank, so it only loads on the
world size that wrote it. DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`)
stores every parameter's fp32 master copy and Adam moments whole, one folder per parameter, and
re-partitions them at load time for any world size (`"checkpoint": {"load_universal": true}`).

The weights are half of a resume; the other half is where the data stopped. The trainer's client
state counts micro-batches *per rank* in the current epoch (`micro_in_epoch`), and the sampler's
position is that count times batch size times world size (one global order handed out round-robin,
see violet_ds.data.sampler). The conversion keeps the global position and rewrites the per-rank count
for the target world size and batch size, so the resumed run neither skips nor repeats a sample.
That is only possible when the consumed samples split evenly over the new ranks; otherwise the
command says which world sizes work.

The RNG streams are per rank: on the same world size every rank's RNG file is copied and the resume is
exact; on another world size none can carry over, and the resume says in its log that masking and dropout
draws restart from the run seed.

The converted checkpoint is a new tag `<tag>-universal` next to the original, marked complete and made
`latest` (the command's output says from which tag it moved; `--set_latest false` leaves it), so
`--run.resume auto` (and a requeued SLURM job) continues from it. Loading it needs
`load_universal` in the DeepSpeed config for that one load: the engine calls `configure_load`, which
sets it exactly when the tag to resume is universal (later checkpoints are ordinary ones again).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from violet_ds.data.sampler import SampleCursor

from . import checkpoint as ckpt
from .checkpoint import COMPLETE_MARKER, LATEST_FILE, MODEL_STATES, UNIVERSAL_SUFFIX  # noqa: F401
from .logging import library_output, library_progress


# ----------------------------------------------------------------------------------------- helpers
def _read_marker(tag_dir: Path) -> dict:
    return ckpt.read_marker(tag_dir)


def resolve_tag(checkpoint_dir: Path, tag: str) -> str:
    """`latest` -> the tag the `latest` file names; anything else must be an existing tag folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if tag == "latest":
        tag = ckpt.read_latest(checkpoint_dir)
        if tag is None:
            raise FileNotFoundError(f"{checkpoint_dir / LATEST_FILE} does not exist: no completed checkpoint in "
                                    f"{checkpoint_dir}")
    else:
        ckpt.check_tag_name(checkpoint_dir, tag, "--tag")
    if not (checkpoint_dir / tag).is_dir():
        known = sorted(p.parent.name for p in checkpoint_dir.glob(f"*/{COMPLETE_MARKER}"))
        raise FileNotFoundError(f"checkpoint {checkpoint_dir / tag} does not exist (complete tags: "
                                f"{', '.join(known) or 'none'})")
    return tag


is_universal = ckpt.is_universal


def configure_load(ds_config: dict, checkpoint_dir: Path, resume: Optional[str]) -> dict:
    """The DeepSpeed config to initialise with when resuming `resume` from `checkpoint_dir`.

    Returns `ds_config` unchanged unless the checkpoint that `resume` designates (auto / latest / a
    tag) is a universal one; then a copy with `checkpoint.load_universal = true`. Call it before
    `deepspeed.initialize`; saving later checkpoints is unaffected (they are ordinary ones again).
    """
    if not resume:
        return ds_config
    checkpoint_dir = Path(checkpoint_dir)
    if resume in ("auto", "latest"):
        tag = ckpt.read_latest(checkpoint_dir)
        if tag is None:
            return ds_config
    else:
        tag = resume
    if not is_universal(checkpoint_dir / tag):
        return ds_config
    configured = copy.deepcopy(ds_config)
    configured.setdefault("checkpoint", {})["load_universal"] = True
    return configured


def _batch_settings(config_text: str, where: str) -> tuple[int, int]:
    """(per-rank micro-batch size, grad_accum) from the resolved YAML a checkpoint carries."""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: the resolved config in the client state is not YAML ({error})") from None
    try:
        batch_size = int(config["data"]["batch_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: the client state's config has no data.batch_size; pass --batch_size") from None
    grad_accum = int(((config.get("engine") or {}).get("grad_accum")) or 1)
    return batch_size, grad_accum


def remap_cursor(micro_in_epoch: int, source_world: int, source_batch: int, target_world: int,
                 target_batch: int, grad_accum: int = 1) -> int:
    """Per-rank micro-batch count that puts `target_world` ranks at the same global sample position.

    The position is `micro_in_epoch * source_batch * source_world` samples into the epoch's global
    order. Raises ValueError (naming the world sizes that would work) when it does not split evenly
    into whole micro-batches of every target rank, or into whole accumulation windows.
    """
    consumed = SampleCursor(micro_in_epoch=micro_in_epoch).samples_in_epoch(source_batch, source_world)
    per_micro = target_batch * target_world
    if consumed % per_micro or (consumed // per_micro) % grad_accum:
        feasible = [w for w in range(1, 257) if consumed % (target_batch * w) == 0
                    and (consumed // (target_batch * w)) % grad_accum == 0] if consumed else []
        raise ValueError(
            f"the checkpoint stopped {consumed} samples into its epoch ({micro_in_epoch} micro-batches x batch "
            f"{source_batch} x {source_world} ranks); {target_world} ranks x batch {target_batch}"
            f"{f' x grad_accum {grad_accum}' if grad_accum > 1 else ''} cannot resume there without skipping or "
            f"repeating samples. World sizes that can (batch {target_batch}): {feasible[:16] or 'none'}; or convert "
            "a checkpoint taken at an epoch boundary, or change --batch_size")
    return consumed // per_micro


def _run_ds_to_universal(source: Path, output: Path, workers: int) -> None:
    """DeepSpeed's ds_to_universal; what it prints goes to the library log, its progress through
    `violet_ds.progress` (a bar on terminals, dated lines elsewhere)."""
    with library_output("ds_to_universal"):  # imported inside: what the import prints goes to the library log
        from deepspeed.checkpoint import ds_to_universal

        args = argparse.Namespace(input_folder=str(source), output_folder=str(output), num_extract_workers=workers,
                                  num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with library_progress(ds_to_universal, "ds_to_universal"):
            ds_to_universal.main(args)


def copy_rng_streams(source: Path, output: Path, source_world: int, target_world: int) -> bool:
    """Copy every rank's RNG file of `source` into `output` when the world size stays the same (each rank then
    continues its own streams); True when they were copied, False on another world size or a missing file."""
    files = [ckpt.rng_file(source, rank) for rank in range(source_world)]
    if target_world != source_world or not all(path.is_file() for path in files):
        return False
    for path in files:
        shutil.copy2(path, Path(output) / path.name)
    return True


# ----------------------------------------------------------------------------------------- conversion
@dataclass
class UniversalConversion:
    """What `universal_checkpoint` did: the tags, the ranks and batch sizes, the data cursor before and after
    (micro-batches per rank in the epoch), where `latest` pointed, and whether the RNG streams were copied."""

    source: Path
    output: Path
    step: int
    epoch: int
    parameters: int
    source_world: int
    target_world: int
    source_batch: int
    target_batch: int
    micro_in_epoch: int
    new_micro: int
    samples_in_epoch: int
    previous_latest: Optional[str]
    set_latest: bool
    rng_streams: bool
    seconds: float


def universal_checkpoint(run_dir: str, tag: str = "latest", world_size: Optional[int] = None,
                         batch_size: Optional[int] = None, workers: int = 1, set_latest: bool = True,
                         force: bool = False) -> UniversalConversion:
    """Convert a run's checkpoint to DeepSpeed's universal format as `<tag>-universal` (`violet-ds
    universal-checkpoint` documents the arguments); raises when the data cursor cannot be remapped exactly."""
    started = time.perf_counter()
    checkpoint_dir = Path(run_dir) / "checkpoints"
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} does not exist: is {run_dir} a violet_ds run directory?")
    tag = resolve_tag(checkpoint_dir, tag)
    source = checkpoint_dir / tag
    marker = _read_marker(source)
    if marker.get("universal"):
        raise ValueError(f"{source} is already a universal checkpoint; convert the checkpoint it came from "
                         f"({marker.get('source_tag')}) for another world size")
    states_file = source / MODEL_STATES
    if not states_file.is_file():
        raise FileNotFoundError(f"{states_file} is missing: not a DeepSpeed ZeRO-1/2 checkpoint")
    # ds_to_universal unpickles without limits: every file of the tag is checked first
    ckpt.check_tag_dir(source)
    states = ckpt.safe_load(states_file)
    missing = [key for key in ("step", "epoch", "micro_in_epoch", "world_size") if key not in states]
    if missing:
        raise KeyError(f"{states_file}: client state lacks {missing} (not written by the violet_ds trainer)")
    source_world = int(states["world_size"])
    source_batch, grad_accum = _batch_settings(states.get("config") or "", str(states_file))
    target_world = int(world_size or source_world)
    target_batch = int(batch_size or source_batch)
    if target_world < 1 or target_batch < 1:
        raise ValueError(f"world_size and batch_size must be >= 1, got {target_world} and {target_batch}")
    micro_in_epoch = int(states["micro_in_epoch"])
    consumed = SampleCursor(micro_in_epoch=micro_in_epoch).samples_in_epoch(source_batch, source_world)
    new_micro = remap_cursor(micro_in_epoch, source_world, source_batch, target_world, target_batch, grad_accum)

    output = checkpoint_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    if output.exists():
        if not force:
            raise FileExistsError(f"{output} exists; pass --force true to rebuild it")
        shutil.rmtree(output)
    staging = checkpoint_dir / f".{output.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"converting {source} ({source_world} ranks, batch {source_batch}) -> {output} "
          f"({target_world} ranks, batch {target_batch})", flush=True)
    _run_ds_to_universal(source, staging, workers)

    # the data cursor for the new ranks; the global position itself does not change
    converted = ckpt.safe_load(staging / MODEL_STATES)
    converted["micro_in_epoch"] = new_micro
    converted["world_size"] = target_world
    converted["samples_in_epoch"] = consumed
    converted["universal_from"] = {"tag": tag, "world_size": source_world, "batch_size": source_batch,
                                   "micro_in_epoch": micro_in_epoch}
    torch.save(converted, staging / f"{MODEL_STATES}.tmp")
    os.replace(staging / f"{MODEL_STATES}.tmp", staging / MODEL_STATES)
    # per-rank RNG streams carry over to the same set of ranks only; on another world size none are copied and
    # the resumed ranks draw fresh masking/dropout streams from the run seed (the resume says so)
    rng_streams = copy_rng_streams(source, staging, source_world, target_world)
    (staging / COMPLETE_MARKER).write_text(json.dumps({
        "tag": output.name, "step": int(states["step"]), "world_size": target_world, "universal": True,
        "source_tag": tag, "source_world_size": source_world, "batch_size": target_batch,
        "rng_streams": rng_streams,
    }))
    os.replace(staging, output)
    previous_latest = ckpt.read_latest(checkpoint_dir)
    if set_latest:
        ckpt.write_latest(checkpoint_dir, output.name)
    params = len([p for p in (output / "zero").iterdir() if p.is_dir()]) if (output / "zero").is_dir() else 0
    return UniversalConversion(
        source=source, output=output, step=int(states["step"]), epoch=states["epoch"], parameters=params,
        source_world=source_world, target_world=target_world, source_batch=source_batch, target_batch=target_batch,
        micro_in_epoch=micro_in_epoch, new_micro=new_micro, samples_in_epoch=consumed,
        previous_latest=previous_latest, set_latest=set_latest, rng_streams=rng_streams,
        seconds=time.perf_counter() - started)
