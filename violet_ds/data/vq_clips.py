"""VIMPAC data: clips of pre-extracted DALL-E VQ tokens, ``(T, H/8, W/8)`` token grids.

Token storage (one integer grid ``(N, h, w)`` per video, ``N`` = stored frames):
- ``.npz``: one array per video id (what `violet-ds convert-pickle` writes from the official VQ
  pickles), opened lazily and read one video at a time, never with pickle;
- VQ TSV (``X.tsv`` + ``X.lineidx``, seek-based through `violet_ds.data.tsv`): rows
  ``video_id \\t N,h,w \\t base64(little-endian int16 codes)``, written by `violet-ds extract-vq`
  (every stored frame of a frame TSV through the DALL-E dVAE encoder, so videos keep their length);
- an `extract-targets` sidecar folder of the ``vq`` target (``--options '{"patch": 8, ...}'`` for
  VIMPAC's 8x downsampling): every video has the same ``num_frames`` there (short videos repeat
  frames instead of getting [PAD]).

Clips are ``clip_frames`` stored frames ``frame_stride`` apart, starting anywhere in the video; a
video shorter than a clip is kept in order and filled with [PAD] frames at the end. A stored grid
larger than the model grid is cropped in token space (random when training, evenly spaced crops at
evaluation). Tokens are never flipped: a code is not mirror-symmetric.

Datasets: `VQPretrainDataset` (two clips per video for the contrastive task: `vq_tokens`,
`vq_tokens_b`) and `VQActionDataset` (`vq_tokens` + `label` when training, `vq_views (V, T, h, w)`
of clips x crops at evaluation). Batches collate with `violet_ds.data.datasets.collate`.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from violet_ds.data import annotations as ann
from violet_ds.data.sidecars import TargetStore
from violet_ds.data.tsv import TSVError, TSVFile, TSVWriter, resolve_tsv_paths

PathLike = Union[str, os.PathLike]

# DALL-E dVAE codebook size and VIMPAC's special rows (docs/reference.md#3-vimpac): the token embedding has 8197
# rows; [PAD] fills frames missing from short videos, [MASK] replaces masked tokens. Defined here, the
# lowest floor that speaks VQ tokens, so token files, the vq target and the VIMPAC model share them.
VQ_CODEBOOK_SIZE = 8192
VQ_PAD_ID = 8193
VQ_MASK_ID = 8196
VQ_VOCAB_ROWS = 8197


class VQTokenError(ValueError):
    """A malformed VQ token sidecar row; the message names the file and video."""


# ---------------------------------------------------------------- encoding of one grid in a TSV row

def encode_token_row(video_id: str, tokens: np.ndarray) -> list[str]:
    """``(N, h, w)`` integer codes -> TSV columns ``[video_id, "N,h,w", base64(int16 LE)]``."""
    array = np.asarray(tokens)
    if array.ndim != 3 or array.dtype.kind not in "iu":
        raise VQTokenError(f"video {video_id!r}: tokens must be an integer array (N, h, w), got "
                           f"{array.dtype} {array.shape}")
    if array.size and (array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max):
        raise VQTokenError(f"video {video_id!r}: token ids outside int16")
    payload = base64.b64encode(array.astype("<i2").tobytes()).decode("ascii")
    return [str(video_id), ",".join(str(d) for d in array.shape), payload]


def decode_token_row(columns: Sequence[str], where: str) -> tuple[str, np.ndarray]:
    """Inverse of `encode_token_row`; ``where`` names the file/row in errors."""
    if len(columns) != 3:
        raise VQTokenError(f"{where}: expected 3 columns (video_id, N,h,w, base64 codes), got {len(columns)}")
    video_id, shape_text, payload = columns
    try:
        shape = tuple(int(d) for d in shape_text.split(","))
    except ValueError:
        raise VQTokenError(f"{where} ({video_id!r}): bad shape column {shape_text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise VQTokenError(f"{where} ({video_id!r}): shape must be N,h,w with positive sizes, got {shape_text!r}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError as err:
        raise VQTokenError(f"{where} ({video_id!r}): codes are not valid base64 ({err})") from None
    expected = int(np.prod(shape)) * 2
    if len(raw) != expected:
        raise VQTokenError(f"{where} ({video_id!r}): {len(raw)} bytes of codes for shape {shape} "
                           f"(expected {expected}); truncated or wrong shape")
    return video_id, np.frombuffer(raw, dtype="<i2").reshape(shape)


def write_vq_tsv(path: PathLike, items: Iterable[tuple[str, np.ndarray]]) -> int:
    """Write ``(video_id, (N, h, w) codes)`` items as a VQ TSV + .lineidx (atomically); returns rows."""
    with TSVWriter(path) as writer:
        for video_id, tokens in items:
            writer.write(encode_token_row(video_id, tokens))
        return writer.rows


# ---------------------------------------------------------------- storage

class VQTokenStore:
    """Video id -> int16 ``(N, h, w)`` codes from ``.npz`` files or VQ TSV shards (path, glob, list).

    Files are opened lazily and again in each process (DataLoader workers must not share handles).
    """

    def __init__(self, spec: Union[PathLike, Sequence[PathLike]]):
        items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        names = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
        if not names:
            raise FileNotFoundError(f"no VQ token file given in {spec!r}")
        self.npz_paths = [Path(n) for n in names if n.endswith(".npz")]
        self.sidecar_paths = [Path(n) for n in names if (Path(n) / "meta.json").is_file()]
        tsv_specs = [n for n in names if not n.endswith(".npz") and Path(n) not in self.sidecar_paths]
        for path in self.npz_paths:
            if not path.is_file():
                raise FileNotFoundError(f"VQ token file not found: {path}")
        self.tsv_files = [TSVFile(p, frame_column=1) for p in resolve_tsv_paths(tsv_specs)] if tsv_specs else []
        self.sidecars = [_open_vq_sidecar(path) for path in self.sidecar_paths]
        self._archives: dict[int, Any] = {}
        self._pid: Optional[int] = None
        self.location: dict[str, tuple[str, int]] = {}
        for number, path in enumerate(self.npz_paths):
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    self.location.setdefault(key, ("npz", number))
        for number, tsv_file in enumerate(self.tsv_files):
            for row, key in enumerate(tsv_file.keys()):
                self.location.setdefault(key, ("tsv", number))
        for number, sidecar in enumerate(self.sidecars):
            for key in sidecar.keys:
                if key in sidecar:  # rows an interrupted extraction has not written yet are absent
                    self.location.setdefault(key, ("sidecar", number))

    def describe(self) -> str:
        paths = [str(p) for p in self.npz_paths] + [str(f.path) for f in self.tsv_files] + \
            [str(p) for p in self.sidecar_paths]
        return ", ".join(paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")

    def __len__(self) -> int:
        return len(self.location)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.location

    def keys(self) -> list[str]:
        return list(self.location)

    def _archive(self, number: int):
        if self._pid != os.getpid():
            self._archives, self._pid = {}, os.getpid()
        if number not in self._archives:
            self._archives[number] = np.load(self.npz_paths[number], allow_pickle=False)
        return self._archives[number]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_archives"], state["_pid"] = {}, None
        return state

    def __getitem__(self, video_id: str) -> np.ndarray:
        try:
            kind, number = self.location[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} has no VQ tokens in {self.describe()}") from None
        if kind == "npz":
            tokens = self._archive(number)[video_id]
            where = f"{self.npz_paths[number]}[{video_id!r}]"
        elif kind == "sidecar":
            sidecar = self.sidecars[number]
            tokens = sidecar.get(video_id).value.numpy()
            where = f"{sidecar.path} [{video_id!r}]"
        else:
            tsv_file = self.tsv_files[number]
            row = tsv_file.row_of(video_id)
            where = f"{tsv_file.path} row {row}"
            _, tokens = decode_token_row(tsv_file[row], where)
        if tokens.ndim != 3 or tokens.dtype.kind not in "iu":
            raise VQTokenError(f"{where}: expected integer codes (N, h, w), got {tokens.dtype} {tokens.shape}")
        return tokens

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self.location:
            yield key, self[key]


def _open_vq_sidecar(path: Path) -> TargetStore:
    """An `extract-targets` store that must hold DALL-E token ids."""
    store = TargetStore(path)
    if store.target_name != "vq" or store.spec.kind != "token":
        raise VQTokenError(f"{path}: sidecar holds target {store.target_name!r} ({store.spec.kind}); "
                           "VIMPAC needs the 'vq' token target")
    return store


# ---------------------------------------------------------------- clip sampling

def clip_span(clip_frames: int, frame_stride: int) -> int:
    """Stored frames covered by one clip."""
    return (clip_frames - 1) * frame_stride + 1


def cut_clip(tokens: np.ndarray, start: int, clip_frames: int, frame_stride: int, top: int, left: int,
             grid: tuple[int, int], pad_id: int) -> torch.Tensor:
    """One clip ``(clip_frames, *grid)`` long: frames ``start + i * stride``, [PAD] past the end."""
    frames = start + frame_stride * np.arange(clip_frames)
    present = frames < tokens.shape[0]
    height, width = grid
    clip = tokens[np.minimum(frames, tokens.shape[0] - 1), top:top + height, left:left + width]
    clip = torch.from_numpy(clip.astype(np.int64))
    if not present.all():
        clip[torch.from_numpy(~present)] = pad_id
    return clip


def evenly_spaced(limit: int, count: int) -> list[int]:
    """``count`` integer offsets spread evenly over ``0..limit`` (inclusive)."""
    if count <= 1:
        return [limit // 2]
    return [int(round(i * limit / (count - 1))) for i in range(count)]


class _ClipMixin:
    """Clip geometry shared by the VQ datasets."""

    clip_frames: int
    frame_stride: int
    grid: Optional[tuple[int, int]]
    pad_id: int
    seed: Optional[int]
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Seeded datasets draw other clips every epoch (the sampler/engine calls this)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            # follow torch's RNG: seeded by the engine, and per DataLoader worker by torch itself
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        return np.random.default_rng((self.seed, self.epoch, index))

    def _grid_of(self, tokens: np.ndarray, where: str) -> tuple[int, int]:
        if self.grid is None:
            return int(tokens.shape[1]), int(tokens.shape[2])
        height, width = self.grid
        if tokens.shape[1] < height or tokens.shape[2] < width:
            raise VQTokenError(f"{where}: stored token grid {tokens.shape[1]}x{tokens.shape[2]} is smaller than "
                               f"the model grid {height}x{width}; extract tokens at a larger resolution")
        return height, width

    def random_clip(self, tokens: np.ndarray, rng: np.random.Generator, where: str) -> torch.Tensor:
        """A clip starting anywhere in the video, with a random crop of the stored grid."""
        grid = self._grid_of(tokens, where)
        last_start = max(tokens.shape[0] - clip_span(self.clip_frames, self.frame_stride), 0)
        start = int(rng.integers(0, last_start + 1))
        top = int(rng.integers(0, tokens.shape[1] - grid[0] + 1))
        left = int(rng.integers(0, tokens.shape[2] - grid[1] + 1))
        return cut_clip(tokens, start, self.clip_frames, self.frame_stride, top, left, grid, self.pad_id)

    def view_clips(self, tokens: np.ndarray, clips: int, crops: int, where: str) -> torch.Tensor:
        """``(clips * crops, T, h, w)``: evenly spaced temporal clips x evenly spaced spatial crops.

        Crops move along the longer stored axis and are centred on the other (3-crop testing).
        """
        grid = self._grid_of(tokens, where)
        last_start = max(tokens.shape[0] - clip_span(self.clip_frames, self.frame_stride), 0)
        starts = evenly_spaced(last_start, clips)
        spare_h, spare_w = tokens.shape[1] - grid[0], tokens.shape[2] - grid[1]
        if spare_h > spare_w:
            corners = [(top, spare_w // 2) for top in evenly_spaced(spare_h, crops)]
        else:
            corners = [(spare_h // 2, left) for left in evenly_spaced(spare_w, crops)]
        views = [cut_clip(tokens, start, self.clip_frames, self.frame_stride, top, left, grid, self.pad_id)
                 for start in starts for top, left in corners]
        return torch.stack(views)


def _video_ids_from_annotations(path: PathLike, split: str) -> list[str]:
    _, loaded = ann.load_any(path, split)
    records = getattr(loaded, "records", loaded)
    seen: dict[str, None] = {}
    for record in records:
        seen.setdefault(record.video, None)
    return list(seen)


def _check_present(store: VQTokenStore, video_ids: Sequence[str], source: str) -> None:
    missing = [v for v in video_ids if v not in store]
    if missing:
        raise KeyError(f"{source}: video {missing[0]!r} has no VQ tokens in {store.describe()} "
                       f"({len(missing)} of {len(video_ids)} videos missing)")


class VQPretrainDataset(_ClipMixin, Dataset):
    """VIMPAC pretraining samples: two clips of one video (``vq_tokens``, ``vq_tokens_b``), each
    ``(clip_frames, h, w)`` and sampled independently anywhere in the video.

    Videos: ``video_ids``, else the videos of ``annotations`` (any annotation format) for ``split``,
    else every video of the token store.
    """

    def __init__(self, tokens: Union[PathLike, VQTokenStore], video_ids: Optional[Sequence[str]] = None,
                 annotations: Optional[PathLike] = None, split: str = "train", clip_frames: int = 5,
                 grid: Optional[tuple[int, int]] = None, frame_stride: int = 1, contrastive: bool = True,
                 pad_id: int = VQ_PAD_ID, seed: Optional[int] = None):
        if clip_frames < 1 or frame_stride < 1:
            raise ValueError(f"clip_frames and frame_stride must be >= 1, got {clip_frames}, {frame_stride}")
        self.store = tokens if isinstance(tokens, VQTokenStore) else VQTokenStore(tokens)
        if video_ids is None and annotations is not None:
            video_ids = _video_ids_from_annotations(annotations, split)
            _check_present(self.store, video_ids, f"{annotations} [{split}]")
        elif video_ids is not None:
            _check_present(self.store, video_ids, "video_ids")
        self.video_ids = list(video_ids) if video_ids is not None else self.store.keys()
        if not self.video_ids:
            raise ValueError(f"no videos to pretrain on in {self.store.describe()}")
        self.clip_frames, self.frame_stride, self.pad_id = clip_frames, frame_stride, pad_id
        self.grid = tuple(grid) if grid is not None else None
        self.contrastive, self.seed, self.epoch = contrastive, seed, 0

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video_id = self.video_ids[index]
        tokens = self.store[video_id]
        rng = self._rng(index)
        where = f"{self.store.describe()} [{video_id!r}]"
        sample = {"vq_tokens": self.random_clip(tokens, rng, where)}
        if self.contrastive:
            sample["vq_tokens_b"] = self.random_clip(tokens, rng, where)
        sample.update(video_id=video_id, index=index)
        return sample


class VQActionDataset(_ClipMixin, Dataset):
    """Action classification on VQ clips from ``{split: [{"video", "label"}], "labels": [...]}``.

    Training: one random clip (``vq_tokens``) + ``label``. Evaluation: ``vq_views``
    ``(eval_clips * eval_crops, T, h, w)`` + ``label``; the task averages predictions over views.
    """

    def __init__(self, tokens: Union[PathLike, VQTokenStore], annotations: PathLike, split: str = "train",
                 clip_frames: int = 5, grid: Optional[tuple[int, int]] = None, frame_stride: int = 1,
                 train: bool = True, eval_clips: int = 1, eval_crops: int = 1,
                 pad_id: int = VQ_PAD_ID, seed: Optional[int] = None):
        if clip_frames < 1 or frame_stride < 1 or eval_clips < 1 or eval_crops < 1:
            raise ValueError("clip_frames, frame_stride, eval_clips and eval_crops must be >= 1")
        self.store = tokens if isinstance(tokens, VQTokenStore) else VQTokenStore(tokens)
        loaded = ann.load_action(annotations, split)
        self.records, self.classes = loaded.records, loaded.labels
        _check_present(self.store, [r.video for r in self.records], f"{annotations} [{split}]")
        self.clip_frames, self.frame_stride, self.pad_id = clip_frames, frame_stride, pad_id
        self.grid = tuple(grid) if grid is not None else None
        self.train, self.eval_clips, self.eval_crops = train, eval_clips, eval_crops
        self.seed, self.epoch = seed, 0

    @property
    def num_classes(self) -> int:
        return len(self.classes) or (max(r.label for r in self.records) + 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        tokens = self.store[record.video]
        where = f"{self.store.describe()} [{record.video!r}]"
        if self.train:
            sample = {"vq_tokens": self.random_clip(tokens, self._rng(index), where)}
        else:
            sample = {"vq_views": self.view_clips(tokens, self.eval_clips, self.eval_crops, where)}
        sample.update(label=record.label, video_id=record.video, index=index)
        return sample


__all__ = [
    "VQTokenError", "VQTokenStore", "VQPretrainDataset", "VQActionDataset", "encode_token_row",
    "decode_token_row", "write_vq_tsv", "cut_clip", "clip_span", "evenly_spaced", "TSVError",
    "VQ_CODEBOOK_SIZE", "VQ_PAD_ID", "VQ_MASK_ID", "VQ_VOCAB_ROWS",
]
