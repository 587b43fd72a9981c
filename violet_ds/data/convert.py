"""Convert the official pickles: frames `{video_id: [b64 JPEG, ...]}` -> TSV, VQ tokens
`{video_id: int16 array (N, h, w)}` (or a list of N `(h, w)` arrays, as in WebVid's file) -> `.npz` (one array per video id, loaded with allow_pickle=False).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from violet_ds.data.safe_pickle import load_restricted_pickle
from violet_ds.data.tsv import TSVWriter


class ConvertError(ValueError):
    pass


def _detect_kind(data: dict, source: str) -> str:
    if not isinstance(data, dict) or not data:
        raise ConvertError(f"{source}: expected a non-empty dict {{video_id: ...}}, got {type(data).__name__}")
    key, value = next(iter(data.items()))
    if isinstance(value, np.ndarray):
        return "vq"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, bytes)):
        return "frames"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        return "vq"  # WebVid's file: a list of per-frame (h, w) token maps
    raise ConvertError(f"{source}: key {key!r}: value of type {type(value).__name__} is neither a frame list nor an array")


def frames_pickle_to_tsv(data: dict, out: Path, source: str) -> int:
    with TSVWriter(out) as writer:
        for key, frames in data.items():
            if not isinstance(frames, (list, tuple)) or not frames:
                raise ConvertError(f"{source}: key {key!r}: expected a non-empty list of frames")
            columns = [str(key)]
            for number, frame in enumerate(frames):
                if isinstance(frame, bytes):
                    frame = frame.decode("ascii")
                if not isinstance(frame, str):
                    raise ConvertError(f"{source}: key {key!r} frame {number}: not a base64 string")
                columns.append(frame)
            writer.write(columns)
        return writer.rows


def vq_pickle_to_npz(data: dict, out: Path, source: str) -> int:
    arrays = {}
    for key, value in data.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
            shapes = {v.shape for v in value}
            if len(shapes) != 1:
                raise ConvertError(f"{source}: key {key!r}: per-frame token maps of different shapes {sorted(shapes)}")
            value = np.stack(value)
        if not isinstance(value, np.ndarray) or value.ndim != 3 or value.dtype.kind not in "iu":
            raise ConvertError(f"{source}: key {key!r}: expected an integer array (N, h, w), got "
                               f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}")
        if value.size and (int(value.max()) > np.iinfo(np.int16).max or int(value.min()) < 0):
            raise ConvertError(f"{source}: key {key!r}: token ids outside 0..32767")
        arrays[str(key)] = value.astype(np.int16, copy=False)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return len(arrays)


def load_vq_tokens(path: Union[str, Path]) -> dict[str, np.ndarray]:
    """Read a converted VQ sidecar (`.npz`) without pickle: {video_id: int16 (N, h, w)}."""
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


@dataclass
class ConvertResult:
    """What `convert_pickle` wrote: the file, how many videos, and what the pickle held (frames or vq)."""

    source: Path
    target: Path
    videos: int
    kind: str


def convert_pickle(src: str, out: Optional[str] = None,
                   kind: Literal["auto", "frames", "vq"] = "auto") -> ConvertResult:
    """Convert an official pickle with a restricted unpickler (`violet-ds convert-pickle` documents the
    arguments). Raises ConvertError, OSError, ValueError or pickle.UnpicklingError for a file it refuses."""
    source = Path(src)
    data = load_restricted_pickle(source)
    detected = _detect_kind(data, str(source)) if kind == "auto" else kind
    if detected == "frames":
        target = Path(out) if out else source.with_suffix(".tsv")
        count = frames_pickle_to_tsv(data, target, str(source))
    else:
        target = Path(out) if out else source.with_suffix(".npz")
        count = vq_pickle_to_npz(data, target, str(source))
    return ConvertResult(source, target, count, detected)
