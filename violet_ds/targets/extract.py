"""Run an expensive MVM teacher once over a frame TSV into a sidecar store.

The store (`violet_ds.data.sidecars.TargetStore`) is a folder of memory-mapped NumPy arrays, one row
per video. A second run with the same settings resumes: rows whose `done` flag is set are skipped. A
run with different settings refuses to touch the store unless `overwrite` is given.

The clips are read deterministically (evenly spaced frames, short-side resize + centre crop), so
the stored target matches training only when the dataset uses the same geometry without random
crops/flips; `TargetStore.matches(...)` lets a run check that before using the sidecar instead of
the live teacher.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from violet_ds.data.datasets import ClipReader
from violet_ds.data.frames import normalize
from violet_ds.data.sidecars import TargetStore, clip_geometry
from violet_ds.data.tsv import TSVFile
from violet_ds.progress import progress as progress_bar

from .base import create_target, resolve_dtype


# ---------------------------------------------------------------------------------------- reading

def read_row_clip(tsv, row: int, num_frames: int, size: int, decoder: str = "auto") -> torch.Tensor:
    """uint8 `(num_frames, 3, size, size)` of one TSV row: evenly spaced frames, resize + centre crop.

    The training datasets' own clip reader in its `sampling="fixed"` mode, so a sidecar holds the
    target of exactly the clip a training run with that mode feeds the model.
    """
    key, frames = tsv.frames(row)
    reader = ClipReader(num_frames, size, train=False, spatial="crop", decoder=decoder, sampling="fixed")
    try:
        return reader(frames)[0]
    except ValueError as err:
        raise ValueError(f"{tsv.path}: row {row} ({key!r}): {err}") from err


def _jsonable(options: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(options, default=str, sort_keys=True))


# ---------------------------------------------------------------------------------------- extraction

@dataclass
class TargetExtraction:
    """What one `extract_targets` run did: clips computed now and found done, the store's fill, the cost."""

    target: str
    output: Path
    new_clips: int
    already_done: int
    stored: int
    store_rows: int
    ms_per_clip: float
    value_shape: Tuple[int, ...]
    value_dtype: str


def extract_targets(
    tsv: str,
    target: str,
    output: str,
    options: Optional[Dict[str, Any]] = None,
    num_frames: int = 4,
    size: int = 224,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "float32",
    store_dtype: str = "float16",
    limit: Optional[int] = None,
    overwrite: bool = False,
    decoder: str = "auto",
    frame_column: Optional[int] = None,
    threads: Optional[int] = None,
) -> TargetExtraction:
    """Pre-compute an MVM target for every clip of a frame TSV into a resumable sidecar store
    (`violet-ds extract-targets` documents the arguments); returns what the run did."""
    if threads:
        torch.set_num_threads(threads)
    if store_dtype not in ("float16", "float32"):
        raise ValueError(f"store_dtype must be float16 or float32, got {store_dtype!r}")
    options = dict(options or {})
    table = TSVFile(tsv, frame_column=frame_column)
    rows = len(table) if limit is None else min(limit, len(table))
    keys = table.keys()[:rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{tsv}: video ids repeat; a sidecar is keyed by video id")
    teacher = create_target(target, **options).to(device, dtype)
    geometry = clip_geometry(num_frames, size)
    probe = torch.zeros(1, num_frames, 3, size, size)
    value_shape = teacher.expected_shape(probe.shape)[1:]
    spec = teacher.spec
    meta = {"target": target, "spec": {"kind": spec.kind, "channels": spec.channels, "loss": spec.loss},
            "options": _jsonable(options), "geometry": geometry, "tsv": str(Path(tsv).resolve()),
            "tsv_rows": len(table)}
    value_dtype = "int16" if spec.kind == "token" else store_dtype
    out = Path(output)
    store = _open_or_create(out, meta, keys, value_shape, value_dtype, num_frames, overwrite)
    todo = [row for row in range(rows) if not store.done[row]]
    started = time.perf_counter()
    with progress_bar(total=rows, initial=rows - len(todo), desc=f"extract {target}", unit="clip") as progress:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            clips = torch.stack([read_row_clip(table, row, num_frames, size, decoder) for row in chunk])
            video = normalize(clips.to(device), dtype=resolve_dtype(dtype) or torch.float32)
            store.write(chunk, teacher.compute(video))
            progress.update(len(chunk))
    per_clip = (time.perf_counter() - started) / max(len(todo), 1)
    return TargetExtraction(target, out, len(todo), rows - len(todo), store.num_done(), len(store),
                            per_clip * 1000, tuple(value_shape), value_dtype)


def _open_or_create(out: Path, meta: Dict[str, Any], keys: List[str], value_shape, value_dtype: str,
                    num_frames: int, overwrite: bool) -> TargetStore:
    if (out / "meta.json").is_file():
        existing = json.loads((out / "meta.json").read_text())
        same = all(existing.get(k) == meta[k] for k in ("target", "spec", "options", "geometry")) and \
            existing.get("value_shape") == list(value_shape) and existing.get("value_dtype") == value_dtype
        stored_keys = (out / "keys.txt").read_text().splitlines() if (out / "keys.txt").is_file() else None
        if same and stored_keys == keys:
            return TargetStore(out, mode="r+")
        if not overwrite:
            raise ValueError(f"{out} holds a store made with other settings or rows "
                             f"(target {existing.get('target')!r}, geometry {existing.get('geometry')}, "
                             f"options {existing.get('options')}); pass --overwrite true or choose another output")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        leftovers = {p.name for p in out.iterdir()}
        if not leftovers <= {"values.npy", "valid.npy", "done.npy", "keys.txt", "meta.json.tmp"}:
            raise ValueError(f"{out} exists and is not a target store; choose an empty or new folder")
    return TargetStore.create(out, meta, keys, value_shape, value_dtype, num_frames)
