"""The one owner of checkpoint state: save, load, resolve a tag, prune, RNG streams, the completion
marker, the client state (step + the run's `SampleCursor`), the resume checks, and reading every
checkpoint file without running code.

Layout of a run's `checkpoints/` directory (DeepSpeed's files plus ours):

    latest                      the tag to resume from; written (tmp + rename) only after all ranks saved
    <tag>/mp_rank_00_model_states.pt                     DeepSpeed: module weights + our client state
    <tag>/*zero_pp_rank_<r>_mp_rank_00_optim_states.pt   DeepSpeed: rank r's optimizer partition
    <tag>/rng_rank<r>.pt                                 ours: every RNG stream of rank r
    <tag>/violet_ds_complete.json                        ours: the completion marker (tag, step, world size)
    <tag>/zero/...                                       universal checkpoints only (per-parameter files)

Safe loading. A checkpoint file is a pickle, and unpickling can call any importable function; DeepSpeed's
checkpoint engine, zero_to_fp32 and ds_to_universal all unpickle without restriction (`weights_only` off). Before
any of them opens a tag directory, `check_tag_dir` reads every `.pt` in it with torch's weights-only
unpickler (memory-mapped, so tensor bytes are not read), admitting only tensors, plain containers and
the few DeepSpeed classes its own files hold (`DEEPSPEED_GLOBALS`). A file with anything else is
refused with its name and the offending global, before a byte of it is executed. Our own files are
read with `safe_load` (weights-only as well).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Tuple

import numpy as np
import torch
import yaml

from violet_ds import paths
from violet_ds.weights import safe_torch_load, unsafe_globals

from ..data.sampler import SampleCursor
from .distributed import World


COMPLETE_MARKER = "violet_ds_complete.json"
LATEST_FILE = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL_SUFFIX = "-universal"
CLIENT_FORMAT = "violet_ds/1"
DIVERGED_NOTE = "violet_ds_diverged.json"

# the classes DeepSpeed's own ZeRO-1/2 checkpoint files pickle (besides tensors and containers):
# the ZeRO stage enum, the fp16/bf16 loss scalers and the parameter-fragment addresses
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the file and what to do."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, read-only or unwritable directory)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds objects whose unpickling could run code."""


# ----------------------------------------------------------------------------------------- safe loading
def _allowed_globals() -> list:
    found = []
    for module_name, name in DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            # an older/newer DeepSpeed without the class cannot have written it either
            continue
    return found


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load` that cannot run code: weights-only, plus DeepSpeed's checkpoint classes.

    Raises UnsafeCheckpointError (naming the file and the refused globals) for a file that holds
    anything else, CheckpointError for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return safe_torch_load(path, map_location=map_location, mmap=mmap, allowed_globals=_allowed_globals())
    except pickle.UnpicklingError as error:
        refused = unsafe_globals(path)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        what = f"refused globals: {', '.join(refused)}" if refused else reason
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects whose unpickling could run code ({what}). Only tensors, "
            "plain containers and DeepSpeed's own checkpoint classes are accepted; do not use checkpoints from "
            "a source you do not trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt ({error})") from None


def check_tag_dir(tag_dir: str | Path) -> int:
    """Read every `.pt` file of a checkpoint tag with `safe_load` (mmap) before DeepSpeed opens any of them.

    Returns the number of files checked. Call it before `engine.load_checkpoint`, zero_to_fp32 and
    ds_to_universal: those load with `weights_only=False`.
    """
    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.rglob("*.pt"))
    for path in files:
        safe_load(path, mmap=True)
    return len(files)


# ----------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG the training step draws from, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank:05d}.pt"


# ----------------------------------------------------------------------------------------- tags
def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def client_state(step: int, cursor: SampleCursor, world_size: int, config: str, skipped_steps: int) -> dict:
    """What the trainer stores next to DeepSpeed's state: where training stands + the resolved config."""
    return {"step": step, **cursor.state_dict(), "world_size": world_size, "config": config,
            "skipped_steps": int(skipped_steps), "format": CLIENT_FORMAT}


def train_position(client: dict, tag: str) -> Tuple[int, SampleCursor]:
    """(optimizer step, data cursor) recorded in a loaded checkpoint's client state."""
    missing = [key for key in ("step", "epoch", "micro_in_epoch") if key not in client]
    if missing:
        raise RuntimeError(f"checkpoint {tag} has no {missing} in its client state (not a violet_ds run)")
    return int(client["step"]), SampleCursor.from_state_dict(client)


def check_tag_name(checkpoint_dir: Path, tag: str, source: str) -> str:
    """A tag must be a folder directly inside `checkpoint_dir` (no path, no `..`, no symlink out of it)."""
    checkpoint_dir = Path(checkpoint_dir)
    plain = bool(tag) and tag not in (".", "..") and "/" not in tag and "\\" not in tag and "\n" not in tag
    if plain:
        target = (checkpoint_dir / tag).resolve()
        plain = target.parent == checkpoint_dir.resolve()
    if not plain:
        raise CheckpointError(f"{source} names {tag!r}, which is not a checkpoint folder inside {checkpoint_dir}; "
                              f"write one of its tags there ({', '.join(complete_tags(checkpoint_dir)) or 'none'})")
    return tag


def read_latest(checkpoint_dir: Path) -> Optional[str]:
    """The tag `latest` names (checked to lie inside `checkpoint_dir`), None without a `latest` file."""
    latest = Path(checkpoint_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    return check_tag_name(checkpoint_dir, latest.read_text().strip(), str(latest))


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically (write + rename)."""
    tmp = Path(checkpoint_dir) / f".{LATEST_FILE}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, Path(checkpoint_dir) / LATEST_FILE)


def read_marker(tag_dir: Path) -> dict:
    marker = Path(tag_dir) / COMPLETE_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{tag_dir} has no {COMPLETE_MARKER}: the checkpoint is incomplete (its save was "
                              "interrupted) or not written by violet_ds")
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{marker}: not valid JSON ({error})") from None


def is_universal(tag_dir: Path) -> bool:
    marker = Path(tag_dir) / COMPLETE_MARKER
    return marker.is_file() and bool(json.loads(marker.read_text()).get("universal"))


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Tags with a completion marker and no divergence note, oldest first (by recorded step)."""
    checkpoint_dir = Path(checkpoint_dir)
    found = []
    for marker in checkpoint_dir.glob(f"*/{COMPLETE_MARKER}"):
        if (marker.parent / DIVERGED_NOTE).is_file():
            continue
        try:
            info = json.loads(marker.read_text())
        except json.JSONDecodeError:
            continue
        found.append((info.get("step") or 0, marker.parent.name))
    return [tag for _, tag in sorted(found)]


def has_checkpoints(checkpoint_dir: Path) -> bool:
    checkpoint_dir = Path(checkpoint_dir)
    return (checkpoint_dir / LATEST_FILE).is_file() or any(checkpoint_dir.glob(f"*/{COMPLETE_MARKER}"))


def resolve_resume_tag(checkpoint_dir: Path, resume: str) -> Optional[str]:
    """`auto` -> latest or None (fresh start); `latest` -> latest or error; else the named tag (checked)."""
    checkpoint_dir = Path(checkpoint_dir)
    if resume in ("auto", "latest"):
        tag = read_latest(checkpoint_dir)
        if tag is None:
            if resume == "auto":
                return None
            raise FileNotFoundError(f"--run.resume latest: no {checkpoint_dir / LATEST_FILE} (no completed "
                                    "checkpoint in this run)")
    else:
        tag = check_tag_name(checkpoint_dir, resume, "--run.resume")
    if not (checkpoint_dir / tag).is_dir():
        known = ", ".join(complete_tags(checkpoint_dir)) or "none"
        raise FileNotFoundError(f"checkpoint {checkpoint_dir / tag} does not exist (complete tags: {known})")
    if not (checkpoint_dir / tag / COMPLETE_MARKER).is_file():
        raise RuntimeError(f"checkpoint {checkpoint_dir / tag} is incomplete (its save was interrupted); "
                           f"resume from an earlier tag: {', '.join(complete_tags(checkpoint_dir)) or 'none'}")
    return tag


def locate(path: str | Path, tag: Optional[str] = None) -> Tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir or a tag dir (+ optional tag)."""
    path = Path(path)
    if (path / MODEL_STATES).is_file():
        if tag is not None and tag != path.name:
            raise ValueError(f"{path} is the checkpoint {path.name!r}, but tag {tag!r} was asked for")
        return path.parent, path.name
    for checkpoint_dir in (path, path / "checkpoints"):
        if tag is not None and (checkpoint_dir / tag / MODEL_STATES).is_file():
            return checkpoint_dir, check_tag_name(checkpoint_dir, tag, "tag")
        if tag is None and (checkpoint_dir / LATEST_FILE).is_file():
            return checkpoint_dir, read_latest(checkpoint_dir)
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint found (expected a run dir, its checkpoints/ dir "
                            f"with a `latest` file, or a tag dir holding {MODEL_STATES})"
                            + (f"; tag {tag!r} not found" if tag else ""))


# ----------------------------------------------------------------------------------------- save / prune
def barrier(world: World) -> None:
    """Every rank reaches this point before any goes on (nothing with one rank)."""
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


# bytes per trainable parameter in the ZeRO optimizer files: the fp32 master copy and AdamW's two fp32 moments
OPTIMIZER_BYTES_PER_PARAM = 12
# pickled metadata, the client state (with the resolved config) and the RNG files
CHECKPOINT_OVERHEAD_BYTES = 1 << 20


def expected_checkpoint_bytes(module: torch.nn.Module) -> int:
    """About how many bytes one checkpoint of `module`'s run takes on disk (all ranks together).

    Estimated as the module's state dict at its own dtypes (every parameter and buffer: DeepSpeed's
    model-states file; bf16 / fp16 training keeps the module in 2 bytes per value) plus
    `OPTIMIZER_BYTES_PER_PARAM` (fp32 master weights + AdamW's exp_avg and exp_avg_sq) per trainable
    parameter (the optimizer files, whose ZeRO partitions add up to the whole), plus
    `CHECKPOINT_OVERHEAD_BYTES`. With ZeRO-2 on the demo's violet-tiny it is within a few percent of
    the files written.
    """
    state = sum(value.numel() * value.element_size() for value in module.state_dict().values()
                if isinstance(value, torch.Tensor))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return state + OPTIMIZER_BYTES_PER_PARAM * trainable + CHECKPOINT_OVERHEAD_BYTES


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


_NO_SPACE = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
# what torch's zip writer (inline_container.cc) says when a write is cut short or a file cannot be created
_TORCH_WRITE_FAILURES = ("unexpected pos", "inline_container", "iostream error", "file write failed",
                         "PytorchStreamWriter failed", "cannot be opened")


def _write_problem(error: BaseException, directory: Path, needed: int) -> Optional[Tuple[str, str]]:
    """(why, what to do) when writing into `directory` failed through the file system's doing (full, quota,
    read-only, not writable); None for any other error."""
    space = "free space (or lower run.keep_last) or choose another --run.output_dir"
    access = "make it writable or choose another --run.output_dir"
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE | _NOT_WRITABLE:
            return (current.strerror or os.strerror(current.errno),
                    space if current.errno in _NO_SPACE else access)
        current = current.__cause__ or current.__context__
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    # torch's zip writer reports a cut-short write without its errno: ask the file system
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS), access
    if not os.access(existing, os.W_OK):
        return os.strerror(errno.EACCES), access
    free = free_bytes(existing)
    if free is not None and free < needed:
        return os.strerror(errno.ENOSPC), space
    text = " ".join(str(error).split())
    if isinstance(error, OSError) or any(marker in text for marker in _TORCH_WRITE_FAILURES):
        return f"the write failed ({text[:200]})", space
    return None


@contextlib.contextmanager
def _unwritten_tag_removed(engine, checkpoint_dir: Path, tag_dir: Path):
    """A save that fails before its tag is complete leaves no partial tag (`latest` is never touched here);
    a failure of the file system (full, quota, read-only, not writable) becomes one CheckpointSaveError
    line naming the path, the bytes a checkpoint needs and the bytes free."""
    try:
        yield
    except BaseException as error:
        shutil.rmtree(tag_dir, ignore_errors=True)
        module = getattr(engine, "module", None)
        needed = expected_checkpoint_bytes(module) if isinstance(module, torch.nn.Module) else 0
        problem = _write_problem(error, tag_dir, needed)
        if problem is None:
            raise
        why, fix = problem
        free = free_bytes(tag_dir)
        try:
            latest = read_latest(checkpoint_dir)
        except CheckpointError:
            latest = None
        raise CheckpointSaveError(
            f"cannot write checkpoint {tag_dir}: {why}; a checkpoint of this run needs about {format_bytes(needed)}, "
            f"{format_bytes(free) if free is not None else 'an unknown amount'} free there. The partial tag was "
            f"removed and `latest` still names {latest or 'no checkpoint'}: {fix}, then resume with "
            "--run.resume auto") from error


def save_checkpoint(engine, checkpoint_dir: Path, tag: str, client_state: dict, world: World,
                    keep_last: int = 0) -> Path:
    """Save on every rank; mark the tag complete and point `latest` at it only once all ranks are done.

    `latest` is replaced atomically (write + rename), so a save interrupted at any point leaves the
    previous `latest` in place.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    with _unwritten_tag_removed(engine, checkpoint_dir, tag_dir):
        # made here, so that an unwritable directory raises (DeepSpeed would log it and write on regardless)
        tag_dir.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), rng_file(tag_dir, world.rank))
    barrier(world)
    if world.is_main:
        (tag_dir / DIVERGED_NOTE).unlink(missing_ok=True)
        marker = {"tag": tag, "step": client_state.get("step"), "world_size": world.world_size}
        with _unwritten_tag_removed(engine, checkpoint_dir, tag_dir):
            (tag_dir / COMPLETE_MARKER).write_text(json.dumps(marker))
        write_latest(checkpoint_dir, tag)
        if keep_last > 0:
            prune_checkpoints(checkpoint_dir, keep_last, protect=tag)
    barrier(world)
    return tag_dir


def prune_checkpoints(checkpoint_dir: Path, keep_last: int, protect: str) -> None:
    tags = complete_tags(checkpoint_dir)
    for tag in tags[:-keep_last] if keep_last else []:
        if tag != protect:
            shutil.rmtree(Path(checkpoint_dir) / tag, ignore_errors=True)


def mark_diverged(checkpoint_dir: Path, tags: Iterable[str], first_bad_step: int) -> None:
    """Note in each tag that its weights produced a non-finite loss: never `latest`, never resumed by `auto`."""
    for tag in tags:
        tag_dir = Path(checkpoint_dir) / tag
        if tag_dir.is_dir():
            (tag_dir / DIVERGED_NOTE).write_text(json.dumps({"first_bad_step": first_bad_step}))


# ----------------------------------------------------------------------------------------- load
def optimizer_files(tag_dir: Path, rank: int) -> list[Path]:
    return sorted(Path(tag_dir).glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


def load_checkpoint(engine, checkpoint_dir: Path, tag: str, world: World) -> dict:
    """Load module, optimizer, scheduler and this rank's RNG; return the client state. Errors, never warns.

    Every file of the tag is checked with `safe_load` first (DeepSpeed itself unpickles without limits).
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    info = read_marker(tag_dir)
    if info.get("world_size", world.world_size) != world.world_size:
        raise CheckpointError(
            f"checkpoint {tag} was written by {info['world_size']} ranks, this run has {world.world_size}; "
            "convert it with `violet-ds universal-checkpoint` to change the number of ranks")
    missing = [name for name in required_files(tag_dir, [world.rank], universal=bool(info.get("universal")))
               if not (tag_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir} lacks {', '.join(missing)}: it cannot be resumed; resume an "
                              f"earlier tag ({', '.join(t for t in complete_tags(checkpoint_dir) if t != tag) or 'none'})")
    check_tag_dir(tag_dir)
    path, client = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    client = dict(client or {})
    rng = rng_file(tag_dir, world.rank)
    if rng.is_file():
        client["rng"] = safe_load(rng)
    return client


def required_files(tag_dir: Path, ranks: Iterable[int], universal: bool) -> list[str]:
    """Files DeepSpeed needs to load the tag on `ranks` (optimizer files by glob: bf16_/fp16 prefixes vary)."""
    names = [MODEL_STATES]
    if not universal:
        for rank in ranks:
            if not optimizer_files(tag_dir, rank):
                names.append(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return names


# ----------------------------------------------------------------------------------------- resume checks
# settings that decide which samples, in which order, through which model a resumed run sees
RESUME_KEYS = ("model.name", "model.overrides", "task.name", "data.train", "data.batch_size", "data.num_frames",
               "data.image_size", "data.max_text_len", "engine.grad_accum", "engine.seed")


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def config_differences(saved: dict, current: dict, keys: Iterable[str] = RESUME_KEYS) -> list[str]:
    out = []
    for key in keys:
        before, now = _lookup(saved, key), _lookup(current, key)
        if json.dumps(before, sort_keys=True, default=str) != json.dumps(now, sort_keys=True, default=str):
            out.append(f"{key}: {_short(before)} in the checkpoint, {_short(now)} now")
    return out


def check_resume(checkpoint_dir: Path, tag: str, config_text: str, world_size: int, allow: bool,
                 warn: Callable[[str], None]) -> list[str]:
    """Before any heavy work: can `tag` be resumed exactly by this run? Returns the differences found.

    Errors (always): a world size the checkpoint cannot load on, a missing model-states or optimizer
    file. Errors unless `allow` (then each is passed to `warn`): a missing RNG file (the losses would
    differ from an uninterrupted run) and a changed model, task, data list, batch/clip size, grad_accum
    or seed. Always a warning: a universal checkpoint without the ranks' RNG files (converted for another
    world size). The LR schedule and AdamW settings are not compared: a resume takes them from its own
    config (the trainer logs each change).
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    info = read_marker(tag_dir)
    universal = bool(info.get("universal"))
    saved_world = int(info.get("world_size") or world_size)
    if saved_world != world_size:
        how = ("it was converted for that many ranks; convert the source tag again for this world size"
               if universal else "convert it with `violet-ds universal-checkpoint --world_size "
               f"{world_size}` to resume on another number of ranks")
        raise CheckpointError(f"cannot resume {tag_dir}: world size {saved_world} in the checkpoint, {world_size} "
                              f"now; {how}")
    missing = [name for name in required_files(tag_dir, range(world_size), universal)
               if not (tag_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"cannot resume {tag_dir}: {', '.join(missing)} missing; resume an earlier tag "
                              f"({', '.join(t for t in complete_tags(checkpoint_dir) if t != tag) or 'none'})")
    problems = []
    missing_rng = [rank for rank in range(world_size) if not rng_file(tag_dir, rank).is_file()]
    if not universal:
        problems += [f"{rng_file(tag_dir, rank).name} missing: the RNG streams (masking, dropout) would restart"
                     for rank in missing_rng]
    elif missing_rng:
        # a universal checkpoint holds the ranks' RNG files only when it was converted for the same world size;
        # changing the world size is its purpose, so this is said, not refused
        source = info.get("source_world_size")
        why = (f"converted from {source} rank(s) to {world_size}, the RNG streams could not move"
               if source not in (None, world_size) else "it holds no RNG files")
        warn(f"resuming the universal checkpoint {tag} is not an exact continuation: {why}; masking and dropout "
             "draws restart from engine.seed (weights, optimizer and data position are exact)")
    states = safe_load(tag_dir / MODEL_STATES, mmap=True)
    saved_text = states.get("config") if isinstance(states, dict) else None
    if saved_text:
        try:
            saved, current = yaml.safe_load(saved_text) or {}, yaml.safe_load(config_text) or {}
        except yaml.YAMLError:
            saved, current = {}, {}
        if isinstance(saved, dict) and isinstance(current, dict):
            # the checkpoint's paths as they are now, should the run directory have moved with its data
            paths.relocate(saved, checkpoint_dir.parent)
            paths.make_absolute(current)
        keys = list(RESUME_KEYS)
        if universal and info.get("batch_size") is not None:
            # universal-checkpoint remapped the cursor for this batch size
            keys.remove("data.batch_size")
            if _lookup(current, "data.batch_size") != info["batch_size"]:
                problems.append(f"data.batch_size: {info['batch_size']} in the universal checkpoint, "
                                f"{_lookup(current, 'data.batch_size')} now")
        problems += config_differences(saved, current, keys)
    if problems:
        if not allow:
            raise CheckpointError(
                f"cannot resume {tag_dir} exactly:\n  - " + "\n  - ".join(problems) +
                "\nRestore those settings, or resume anyway (not an exact continuation) with "
                "--run.allow_inexact_resume true")
        for problem in problems:
            warn(f"resuming {tag} inexactly (--run.allow_inexact_resume): {problem}")
    return problems
