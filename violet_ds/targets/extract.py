"""`violet-ds extract-targets`: run an expensive MVM teacher once over a frame TSV into a sidecar store.

The sidecar is a folder of NumPy arrays (memory-mapped, so rows are written and read in place):

    meta.json    target name, spec, options, clip geometry (frames, size, crop), value shape/dtype
    keys.txt     video ids, one per row, in TSV row order
    values.npy   (rows, *value_shape) float16/float32 (regression targets) or int16 (token ids)
    valid.npy    (rows, T) bool, the target's per-frame validity (e.g. optical-flow pairs kept)
    done.npy     (rows,) bool, set only after that row's value and valid are flushed

A second run with the same settings resumes: rows whose `done` flag is set are skipped. A run with
different settings refuses to touch the store unless `overwrite` is given.

The clips are read deterministically (evenly spaced frames, short-side resize + centre crop), so
the stored target matches training only when the dataset uses the same geometry without random
crops/flips; `TargetStore.matches(...)` lets the dataset check that before using the sidecar
instead of the live teacher.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .base import TargetOutput, TargetSpec, create_target, resolve_dtype

STORE_VERSION = 1
ClipGeometry = Dict[str, Any]


# ---------------------------------------------------------------------------------------- reading

def read_clip(tsv, row: int, num_frames: int, size: int, decoder: str = "auto") -> torch.Tensor:
    """uint8 `(num_frames, 3, size, size)` of one TSV row: evenly spaced frames, resize + centre crop.

    The training datasets' own clip reader in its `sampling="fixed"` mode, so a sidecar holds the
    target of exactly the clip a training run with that mode feeds the model.
    """
    from violet_ds.data.datasets import ClipReader

    key, frames = tsv.frames(row)
    reader = ClipReader(num_frames, size, train=False, spatial="crop", decoder=decoder, sampling="fixed")
    try:
        return reader(frames)[0]
    except ValueError as err:
        raise ValueError(f"{tsv.path}: row {row} ({key!r}): {err}") from err


def _geometry(num_frames: int, size: int) -> ClipGeometry:
    return {"num_frames": int(num_frames), "size": int(size), "sampling": "segment-centre", "spatial": "crop"}


def _jsonable(options: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(options, default=str, sort_keys=True))


# ------------------------------------------------------------------------------------------ store

class TargetStore:
    """Reader/writer of a target sidecar folder (see the module docstring)."""

    def __init__(self, path: Union[str, os.PathLike], mode: str = "r"):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a target store (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != STORE_VERSION:
            raise ValueError(f"{meta_path}: store version {self.meta.get('version')} != {STORE_VERSION}")
        self.keys: List[str] = (self.path / "keys.txt").read_text().splitlines()
        self._row = {key: i for i, key in enumerate(self.keys)}
        self.values = np.load(self.path / "values.npy", mmap_mode=mode)
        self.valid = np.load(self.path / "valid.npy", mmap_mode=mode)
        self.done = np.load(self.path / "done.npy", mmap_mode=mode)
        if len(self.values) != len(self.keys) or len(self.done) != len(self.keys):
            raise ValueError(f"{self.path}: keys.txt has {len(self.keys)} rows but the arrays hold "
                             f"{len(self.values)} values / {len(self.done)} done flags")

    @property
    def spec(self) -> TargetSpec:
        return TargetSpec(**self.meta["spec"])

    @property
    def target_name(self) -> str:
        return self.meta["target"]

    def __len__(self) -> int:
        return len(self.keys)

    def num_done(self) -> int:
        return int(np.count_nonzero(self.done))

    def __contains__(self, key: str) -> bool:
        row = self._row.get(key)
        return row is not None and bool(self.done[row])

    def matches(self, target: str, num_frames: int, size: int) -> bool:
        """Whether this store holds `target` for clips of this geometry (what the dataset must check)."""
        return self.meta["target"] == target and self.meta["geometry"] == _geometry(num_frames, size)

    def get(self, key: str) -> TargetOutput:
        """The stored target of one video: `value (T, ...)`, `valid (T,)`."""
        row = self._row.get(key)
        if row is None:
            raise KeyError(f"{self.path}: no video id {key!r}")
        if not self.done[row]:
            raise KeyError(f"{self.path}: video id {key!r} (row {row}) was not extracted yet "
                           "(rerun `violet-ds extract-targets` to resume)")
        value = torch.from_numpy(np.array(self.values[row]))
        if self.spec.kind == "token":
            value = value.long()
        return TargetOutput(value, torch.from_numpy(np.array(self.valid[row])))

    def get_batch(self, keys: Sequence[str]) -> TargetOutput:
        """Stacked targets of several videos: `value (B, T, ...)`, `valid (B, T)`."""
        outs = [self.get(key) for key in keys]
        return TargetOutput(torch.stack([o.value for o in outs]), torch.stack([o.valid for o in outs]))

    @classmethod
    def create(cls, path: Union[str, os.PathLike], meta: Dict[str, Any], keys: Sequence[str],
               value_shape: Sequence[int], value_dtype: str, num_frames: int) -> "TargetStore":
        """Lay out an empty store (arrays preallocated on disk) and open it for writing."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        rows = len(keys)
        np.lib.format.open_memmap(path / "values.npy", mode="w+", dtype=np.dtype(value_dtype),
                                  shape=(rows, *value_shape)).flush()
        np.lib.format.open_memmap(path / "valid.npy", mode="w+", dtype=np.bool_, shape=(rows, num_frames)).flush()
        np.lib.format.open_memmap(path / "done.npy", mode="w+", dtype=np.bool_, shape=(rows,)).flush()
        (path / "keys.txt").write_text("".join(f"{key}\n" for key in keys))
        meta = dict(meta, version=STORE_VERSION, rows=rows, value_shape=list(value_shape), value_dtype=value_dtype)
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        # meta.json last: a store without it is an unfinished layout and is recreated
        tmp.replace(path / "meta.json")
        return cls(path, mode="r+")

    def write(self, rows: Sequence[int], out: TargetOutput) -> None:
        """Store the targets of `rows` (value `(len(rows), ...)`), then mark them done."""
        index = np.asarray(rows, dtype=np.int64)
        value = out.value.detach().cpu()
        if self.spec.kind == "token":
            value = value.to(torch.int16)
        else:
            value = value.float()
        self.values[index] = value.numpy().astype(self.values.dtype, copy=False)
        valid = torch.ones(value.shape[:2], dtype=torch.bool) if out.valid is None else out.valid.cpu()
        self.valid[index] = valid.numpy()
        self.values.flush()
        self.valid.flush()
        # flags only after the data is on disk: a killed run never leaves a row marked but empty
        self.done[index] = True
        self.done.flush()


# ---------------------------------------------------------------------------------------- command

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
) -> int:
    """Pre-compute an MVM target for every clip of a frame TSV into a resumable sidecar store.

    Args:
        tsv: frame TSV (`video_id<TAB>b64 JPEG ...`, with its .lineidx or one is built).
        target: registered target name (optical_flow, depth, vq, 2d_feature, 2d_clip_feature, 3d_feature, hog, pixel).
        output: sidecar folder to create or resume (meta.json, keys.txt, values.npy, valid.npy, done.npy).
        options: the target's options, e.g. {"checkpoint": "raft_large.pth"} or {"model_dir": "dpt-large/"}.
        num_frames: frames per clip (evenly spaced, segment centres).
        size: square frame side after short-side resize and centre crop (multiple of 32).
        batch_size: clips per teacher call.
        device: where the teacher runs (cpu, cuda, cuda:1).
        dtype: teacher compute dtype (float32, bf16, fp16).
        store_dtype: float16 or float32 for regression targets (token ids are always int16).
        limit: only the first N rows (smoke runs).
        overwrite: delete an existing store made with other settings instead of refusing.
        decoder: JPEG decoder (auto, simplejpeg, pillow).
        frame_column: first frame column (default: detected; 1 official layout, 2 VIOLETv2's).
        threads: torch CPU threads (default: torch's own choice).
    """
    from violet_ds.engine.logging import progress as tqdm  # a bar on terminals, lines in log files

    from violet_ds.data.frames import normalize
    from violet_ds.data.tsv import TSVFile

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
    geometry = _geometry(num_frames, size)
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
    with tqdm(total=rows, initial=rows - len(todo), desc=f"extract {target}", unit="clip") as progress:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            clips = torch.stack([read_clip(table, row, num_frames, size, decoder) for row in chunk])
            video = normalize(clips.to(device), dtype=resolve_dtype(dtype) or torch.float32)
            store.write(chunk, teacher.compute(video))
            progress.update(len(chunk))
    elapsed = time.perf_counter() - started
    per_clip = elapsed / max(len(todo), 1)
    print(f"extract-targets: {target} -> {out}: {len(todo)} new clips, {rows - len(todo)} already done, "
          f"{store.num_done()}/{len(store)} in store; {per_clip * 1000:.1f} ms/clip; value {tuple(value_shape)} {value_dtype}")
    return 0


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


# ------------------------------------------------------------------------------- using a sidecar

def open_stores(paths: Dict[str, Union[str, os.PathLike]], num_frames: int, size: int) -> Dict[str, TargetStore]:
    """Open `{target name: sidecar folder}`, refusing stores made for another target or clip geometry."""
    stores = {}
    for name, path in paths.items():
        store = TargetStore(path)
        if not store.matches(name, num_frames, size):
            raise ValueError(f"{path}: sidecar holds target {store.target_name!r} with geometry "
                             f"{store.meta['geometry']}, the run needs {name!r} with {_geometry(num_frames, size)}")
        stores[name] = store
    return stores


def open_sidecars(paths: Sequence[Union[str, os.PathLike]], num_frames: int, size: int) -> Dict[str, TargetStore]:
    """Open sidecar folders keyed by the target each holds, checking their clip geometry.

    Two folders holding the same target are refused (which one a batch should use is ambiguous).
    """
    stores: Dict[str, TargetStore] = {}
    for path in paths:
        store = TargetStore(path)
        name = store.target_name
        if name in stores:
            raise ValueError(f"sidecars {stores[name].path} and {store.path} both hold target {name!r}; "
                             "give one sidecar per target")
        if not store.matches(name, num_frames, size):
            raise ValueError(f"{path}: sidecar holds target {name!r} with geometry {store.meta['geometry']}, "
                             f"the run needs {_geometry(num_frames, size)} (data.num_frames / data.image_size)")
        stores[name] = store
    return stores


def attach_targets(batch: Dict[str, Any], stores: Dict[str, TargetStore]) -> Dict[str, Any]:
    """Add `mvm_target:<name>` / `mvm_target_valid:<name>` to a collated batch from the sidecars.

    A target is attached only when *every* video of the batch is in its store; otherwise the key is
    left out and the task falls back to the live teacher for that batch (see
    `base.target_from_batch`). Regression values come back as float32, token ids as int64.
    """
    video_ids = batch.get("video_id")
    if video_ids is None:
        raise KeyError("attach_targets: the batch has no 'video_id' list to look the sidecar up by")
    for name, store in stores.items():
        if all(video_id in store for video_id in video_ids):
            out = store.get_batch(video_ids)
            value = out.value if store.spec.kind == "token" else out.value.float()
            batch[f"mvm_target:{name}"] = value
            batch[f"mvm_target_valid:{name}"] = out.valid
    return batch


class SidecarCollate:
    """A collate function that attaches pre-extracted targets: `DataLoader(..., collate_fn=SidecarCollate(...))`.

    Only valid when the loader's clips have the sidecar's geometry (evenly spaced frames, resize +
    centre crop, no random crop or flip): `open_stores` checks frames and size, the caller the rest.
    """

    def __init__(self, collate_fn, stores: Dict[str, TargetStore]):
        self.collate_fn = collate_fn
        self.stores = stores

    def __call__(self, samples):
        return attach_targets(self.collate_fn(samples), self.stores)
