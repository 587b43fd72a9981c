"""Target sidecars: per-video MVM targets computed once (`violet-ds extract-targets`) and read with the data.

A sidecar is a folder of NumPy arrays (memory-mapped, so rows are written and read in place):

    meta.json    target name, spec, options, clip geometry (frames, size, crop), value shape/dtype
    keys.txt     video ids, one per row, in TSV row order
    values.npy   (rows, *value_shape) float16/float32 (regression targets) or int16 (token ids)
    valid.npy    (rows, T) bool, the target's per-frame validity (e.g. optical-flow pairs kept)
    done.npy     (rows,) bool, set only after that row's value and valid are flushed

The stored target matches training only when the dataset reads clips with the geometry extraction
used (evenly spaced frames, short-side resize + centre crop, no random crop or flip):
`TargetStore.matches(...)` is what a run checks before it takes targets from a sidecar instead of the
live teacher. `SidecarCollate` attaches them to collated batches (`mvm_target:<name>`).

What a target value is (`TargetSpec`, `TargetOutput`) is defined here rather than in
`violet_ds.targets`: sidecars store target values, and the data floor depends on nothing above it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

KINDS = ("dense", "token", "feature")
LOSSES = ("l1", "smooth_l1", "mse", "cross_entropy")
STORE_VERSION = 1
ClipGeometry = Dict[str, Any]


@dataclass(frozen=True)
class TargetSpec:
    """What a target produces and how it is scored: enough for the task to build the MVM head."""

    kind: str
    channels: int
    loss: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TargetSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"TargetSpec.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.kind == "token" and self.loss != "cross_entropy":
            raise ValueError("a token target is scored with cross_entropy")
        if self.channels <= 0:
            raise ValueError(f"TargetSpec.channels must be positive, got {self.channels}")


@dataclass
class TargetOutput:
    """A computed target: `value` in the layout of its spec's kind; `valid` bool `(B, T)` or None (all valid)."""

    value: torch.Tensor
    valid: Optional[torch.Tensor] = None

    def to(self, device: Union[str, torch.device, None] = None) -> "TargetOutput":
        valid = None if self.valid is None else self.valid.to(device)
        return TargetOutput(self.value.to(device), valid)


def clip_geometry(num_frames: int, size: int) -> ClipGeometry:
    """How extraction reads a clip (recorded in meta.json; a run's reader must read the same way)."""
    return {"num_frames": int(num_frames), "size": int(size), "sampling": "segment-centre", "spatial": "crop"}


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
        return self.meta["target"] == target and self.meta["geometry"] == clip_geometry(num_frames, size)

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


# ------------------------------------------------------------------------------- using a sidecar

def open_stores(paths: Dict[str, Union[str, os.PathLike]], num_frames: int, size: int) -> Dict[str, TargetStore]:
    """Open `{target name: sidecar folder}`, refusing stores made for another target or clip geometry."""
    stores = {}
    for name, path in paths.items():
        store = TargetStore(path)
        if not store.matches(name, num_frames, size):
            raise ValueError(f"{path}: sidecar holds target {store.target_name!r} with geometry "
                             f"{store.meta['geometry']}, the run needs {name!r} with "
                             f"{clip_geometry(num_frames, size)}")
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
                             f"the run needs {clip_geometry(num_frames, size)} (data.num_frames / data.image_size)")
        stores[name] = store
    return stores


def attach_targets(batch: Dict[str, Any], stores: Dict[str, TargetStore]) -> Dict[str, Any]:
    """Add `mvm_target:<name>` / `mvm_target_valid:<name>` to a collated batch from the sidecars.

    A target is attached only when *every* video of the batch is in its store; otherwise the key is
    left out and the task falls back to the live teacher for that batch (see
    `violet_ds.targets.base.target_from_batch`). Regression values come back as float32, token ids
    as int64.
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


__all__ = ["TargetSpec", "TargetOutput", "TargetStore", "SidecarCollate", "attach_targets", "open_sidecars",
           "open_stores", "clip_geometry", "KINDS", "LOSSES", "STORE_VERSION"]
