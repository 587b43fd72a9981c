"""Seek-based TSV shards: one row per video, `video_id \\t [extra \\t] b64(JPEG) \\t ... \\n`.

A `.lineidx` sidecar next to `X.tsv` holds the byte offset where each row starts, one per line
(the official layout). VIOLETv2/LAVENDER files index rows by video id instead: their sidecar lines
are `video_id \\t offset`, or the sidecar is a JSON object `{video_id: offset}`; both are read.
Those files also carry one extra column before the frames (frames start at column 2); the frame
column is detected from the first row (the first column that holds a base64 JPEG/PNG) unless given.

`TSVFile` opens its file lazily and again in every new process (DataLoader workers fork with the
parent's state; a shared file position would interleave their reads). Every read checks that the
offset it used starts a row and that the row ends with a newline before the next row begins, so a
stale `.lineidx` or a truncated TSV fails with the file and row named instead of yielding garbage.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from violet_ds.progress import progress as progress_bar

# data.frames (torch) is imported by validate_tsv's decoding only: build-index and convert-pickle run without torch

PathLike = Union[str, os.PathLike]

# base64 of the first bytes of a JPEG (FF D8 FF) and a PNG (89 50 4E 47): how frame columns look.
IMAGE_B64_PREFIXES = ("/9j/", "iVBORw0KGgo")


class TSVError(ValueError):
    """Bad TSV or .lineidx content; the message names the file and the row."""


def lineidx_path(tsv_path: PathLike) -> Path:
    path = Path(tsv_path)
    return path.with_name(path.stem + ".lineidx") if path.suffix == ".tsv" else Path(str(path) + ".lineidx")


def looks_like_image_b64(value: str) -> bool:
    return value.startswith(IMAGE_B64_PREFIXES)


def _scan_row_offsets(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, raw line) for every row; raw lines keep their trailing newline (if any)."""
    with open(path, "rb") as handle:
        offset = 0
        for line in handle:
            yield offset, line
            offset += len(line)


def build_lineidx(tsv_path: PathLike, out_path: Optional[PathLike] = None, with_keys: bool = False,
                  progress: bool = False) -> Path:
    """Write the `.lineidx` of a TSV (atomically); returns its path. Fails on a truncated last row."""
    tsv_path = Path(tsv_path)
    out_path = Path(out_path) if out_path is not None else lineidx_path(tsv_path)
    lines = []
    iterator: Iterable = _scan_row_offsets(tsv_path)
    if progress:
        iterator = progress_bar(iterator, desc=f"indexing {tsv_path.name}", unit="row")
    for row, (offset, line) in enumerate(iterator):
        if not line.endswith(b"\n"):
            raise TSVError(f"{tsv_path}: row {row} (byte {offset}) has no final newline: the file is truncated")
        if with_keys:
            key = line.split(b"\t", 1)[0].rstrip(b"\n").decode("utf-8")
            lines.append(f"{key}\t{offset}\n")
        else:
            lines.append(f"{offset}\n")
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(lines))
    os.replace(tmp, out_path)
    return out_path


def read_lineidx(path: Path) -> tuple[np.ndarray, Optional[list[str]]]:
    """Parse a `.lineidx` in any of the three layouts -> (offsets int64, keys or None)."""
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            mapping = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise TSVError(f"{path}: invalid JSON index: {err}") from err
        items = sorted(((int(offset), str(key)) for key, offset in mapping.items()))
        return np.array([o for o, _ in items], dtype=np.int64), [k for _, k in items]
    offsets, keys = [], []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            offsets.append(int(parts[-1]))
        except ValueError:
            raise TSVError(f"{path}: line {number}: expected an offset or `key<TAB>offset`, got {line[:60]!r}") from None
        if len(parts) == 2:
            keys.append(parts[0])
        elif len(parts) != 1:
            raise TSVError(f"{path}: line {number}: expected an offset or `key<TAB>offset`, got {line[:60]!r}")
    if keys and len(keys) != len(offsets):
        raise TSVError(f"{path}: some lines have a key and some do not")
    array = np.array(offsets, dtype=np.int64)
    if keys:
        order = np.argsort(array, kind="stable")
        array, keys = array[order], [keys[i] for i in order]
    return array, (keys or None)


class TSVFile:
    """Random access to the rows of a TSV through its `.lineidx` (built when missing).

    `tsv[i]` -> list of column strings; `tsv.seek(video_id)` -> the same by key; `tsv.frames(i)` ->
    (key, list of base64 frame strings) honouring the frame column of either layout.
    """

    def __init__(self, path: PathLike, frame_column: Optional[int] = None, build_index: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"TSV file not found: {self.path}")
        self.index_path = lineidx_path(self.path)
        self._frame_column = frame_column
        self._build_index = build_index
        self._offsets: Optional[np.ndarray] = None
        self._keys: Optional[list[str]] = None
        self._key_to_row: Optional[dict[str, int]] = None
        self._handle = None
        self._pid: Optional[int] = None
        self._size = self.path.stat().st_size

    # ---- index
    def _load_index(self) -> None:
        if self._offsets is not None:
            return
        if not self.index_path.is_file():
            if not self._build_index:
                raise FileNotFoundError(f"{self.path}: no {self.index_path.name} (run `violet-ds build-index`)")
            try:
                build_lineidx(self.path)
                offsets, keys = read_lineidx(self.index_path)
            except PermissionError:
                # read-only dataset folder: keep the index in memory only
                offsets = np.array([o for o, _ in _scan_row_offsets(self.path)], dtype=np.int64)
                keys = None
        else:
            offsets, keys = read_lineidx(self.index_path)
        if len(offsets):
            if offsets[0] != 0:
                raise TSVError(f"{self.index_path}: first offset is {offsets[0]}, not 0")
            bad = np.nonzero(np.diff(offsets) <= 0)[0]
            if len(bad):
                raise TSVError(f"{self.index_path}: offsets not increasing at row {int(bad[0]) + 1}")
            if offsets[-1] >= self._size:
                raise TSVError(f"{self.index_path}: row {len(offsets) - 1} starts at byte {offsets[-1]} "
                               f"but {self.path} has only {self._size} bytes (truncated TSV or stale index)")
        elif self._size:
            raise TSVError(f"{self.index_path}: empty index for a non-empty {self.path}")
        self._offsets, self._keys = offsets, keys

    def __len__(self) -> int:
        self._load_index()
        return len(self._offsets)

    @property
    def offsets(self) -> np.ndarray:
        self._load_index()
        return self._offsets

    # ---- file handle, per process
    def _file(self):
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            # never close a handle inherited from the parent: its position is shared with it
            self._handle = open(self.path, "rb")
            self._pid = pid
        return self._handle

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._pid = None, None

    # ---- rows
    def read_bytes(self, row: int) -> bytes:
        """Raw bytes of one row without its newline, after checking it is a whole row."""
        self._load_index()
        count = len(self._offsets)
        if not -count <= row < count:
            raise IndexError(f"{self.path}: row {row} out of range ({count} rows)")
        row %= count
        start = int(self._offsets[row])
        end = int(self._offsets[row + 1]) if row + 1 < count else self._size
        handle = self._file()
        # one byte before the row must be a newline: detects an offset pointing mid-row
        begin = start - 1 if start > 0 else 0
        handle.seek(begin)
        data = handle.read(end - begin)
        if start > 0:
            if data[:1] != b"\n":
                raise TSVError(f"{self.index_path}: row {row} offset {start} does not start a row of {self.path} "
                               f"(stale or corrupt .lineidx; rebuild it with `violet-ds build-index --tsv {self.path} --force true`)")
            data = data[1:]
        if len(data) != end - start:
            raise TSVError(f"{self.path}: row {row} is truncated (expected {end - start} bytes, read {len(data)})")
        newline = data.find(b"\n")
        if newline != len(data) - 1:
            if newline == -1:
                raise TSVError(f"{self.path}: row {row} has no final newline: the file is truncated")
            raise TSVError(f"{self.index_path}: row {row} spans several lines of {self.path} "
                           "(the .lineidx misses a row; rebuild it)")
        return data[:-1]

    def __getitem__(self, row: int) -> list[str]:
        data = self.read_bytes(row)
        try:
            return data.decode("utf-8").split("\t")
        except UnicodeDecodeError as err:
            raise TSVError(f"{self.path}: row {row} is not valid UTF-8 ({err})") from err

    def __iter__(self) -> Iterator[list[str]]:
        for row in range(len(self)):
            yield self[row]

    # ---- keys
    def key(self, row: int) -> str:
        self._load_index()
        if self._keys is not None:
            return self._keys[row]
        return self.keys()[row]

    def keys(self) -> list[str]:
        """Video ids in row order (read from the sidecar when it has them, else from each row's start)."""
        self._load_index()
        if self._keys is None:
            keys = []
            handle = self._file()
            for start in self._offsets.tolist():
                handle.seek(start)
                head = handle.read(256)
                while b"\t" not in head and b"\n" not in head:
                    more = handle.read(4096)
                    if not more:
                        break
                    head += more
                cut = min(i for i in (head.find(b"\t"), head.find(b"\n"), len(head)) if i >= 0)
                keys.append(head[:cut].decode("utf-8", errors="replace"))
            self._keys = keys
        return self._keys

    def row_of(self, key: str) -> int:
        if self._key_to_row is None:
            keys = self.keys()
            mapping = {}
            for row, name in enumerate(keys):
                mapping.setdefault(name, row)
            self._key_to_row = mapping
        try:
            return self._key_to_row[key]
        except KeyError:
            raise KeyError(f"{self.path}: no row for video id {key!r}") from None

    def __contains__(self, key: str) -> bool:
        try:
            self.row_of(key)
        except KeyError:
            return False
        return True

    def seek(self, key: str) -> list[str]:
        """The columns of the row whose first column is `key` (the video id)."""
        row = self.row_of(key)
        columns = self[row]
        if columns[0] != key:
            raise TSVError(f"{self.index_path}: key {key!r} points at row {row} whose id is {columns[0]!r}")
        return columns

    # ---- frames
    @property
    def frame_column(self) -> int:
        if self._frame_column is None:
            self._frame_column = detect_frame_column(self[0], where=f"{self.path}: row 0") if len(self) else 1
        return self._frame_column

    def frames(self, row: int) -> tuple[str, list[str]]:
        columns = self[row]
        frames = columns[self.frame_column:]
        if not frames or frames == [""]:
            raise TSVError(f"{self.path}: row {row} ({columns[0]!r}) has no frame columns")
        return columns[0], frames

    def frames_by_key(self, key: str) -> list[str]:
        return self.frames(self.row_of(key))[1]

    def __repr__(self) -> str:
        return f"TSVFile({str(self.path)!r})"


def detect_frame_column(columns: Sequence[str], where: str = "row") -> int:
    """Index of the first column holding a base64 image (1 in the official layout, 2 in VIOLETv2's)."""
    for index, value in enumerate(columns[1:], start=1):
        if looks_like_image_b64(value):
            return index
    raise TSVError(f"{where}: no column looks like a base64 JPEG/PNG frame; pass frame_column explicitly")


class TSVWriter:
    """Write `X.tsv` + `X.lineidx` through temporary files renamed into place on `close()`.

    A crash leaves no partial `X.tsv` behind, so a resumed extraction can trust every shard it finds.
    """

    def __init__(self, path: PathLike, with_keys: bool = False):
        self.path = Path(path)
        self.index_path = lineidx_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"
        self._tmp_tsv = self.path.with_name(self.path.name + suffix)
        self._tmp_idx = self.index_path.with_name(self.index_path.name + suffix)
        self._tsv = open(self._tmp_tsv, "wb")
        self._idx = open(self._tmp_idx, "w")
        self._offset = 0
        self._with_keys = with_keys
        self.rows = 0
        self._closed = False

    def write(self, columns: Sequence[str]) -> None:
        if not columns:
            raise ValueError(f"{self.path}: empty row")
        for index, value in enumerate(columns):
            if "\t" in value or "\n" in value or "\r" in value:
                raise ValueError(f"{self.path}: row {self.rows} column {index} contains a tab or newline")
        data = ("\t".join(columns) + "\n").encode("utf-8")
        self._idx.write(f"{columns[0]}\t{self._offset}\n" if self._with_keys else f"{self._offset}\n")
        self._tsv.write(data)
        self._offset += len(data)
        self.rows += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._tsv, self._idx):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        # the index goes last: a TSV without index is rebuilt, an index without TSV would mislead
        os.replace(self._tmp_tsv, self.path)
        os.replace(self._tmp_idx, self.index_path)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._tsv, self._idx):
            handle.close()
        for tmp in (self._tmp_tsv, self._tmp_idx):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TSVWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def resolve_tsv_paths(spec: Union[str, PathLike, Sequence[PathLike]]) -> list[Path]:
    """A path, a glob, a comma-separated list, or a list of those -> sorted existing TSV paths."""
    items: list[str] = []
    if isinstance(spec, (list, tuple)):
        for entry in spec:
            items.extend(str(entry).split(","))
    else:
        items = str(spec).split(",")
    paths: list[Path] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no TSV matches {item!r}")
            paths.extend(Path(m) for m in matches)
        else:
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"TSV file not found: {path}")
            paths.append(path)
    if not paths:
        raise FileNotFoundError(f"no TSV given in {spec!r}")
    return paths


# ---------------------------------------------------------------- validation

def validate_tsv(path: PathLike, frame_column: Optional[int] = None, decode: bool = False,
                 progress: bool = True) -> dict:
    """Check a TSV against its `.lineidx`; returns a report dict with `ok`, counts and the first error."""
    path = Path(path)
    index = lineidx_path(path)
    report = {"tsv": str(path), "rows": 0, "frames": 0, "min_frames": None, "max_frames": None,
              "frame_column": frame_column, "ok": False, "error": None}
    if not path.is_file():
        report["error"] = f"{path}: file not found"
        return report
    if not index.is_file():
        report["error"] = f"{path}: no {index.name} (run `violet-ds build-index`)"
        return report
    try:
        offsets, keys = read_lineidx(index)
    except TSVError as err:
        report["error"] = str(err)
        return report
    decoder = None
    if decode:
        from violet_ds.data.frames import decode_jpeg as decoder
    iterator: Iterable = _scan_row_offsets(path)
    if progress:
        iterator = progress_bar(iterator, desc=f"validating {path.name}", unit="row", leave=False)
    frame_counts = []
    row = -1
    for row, (offset, line) in enumerate(iterator):
        if row >= len(offsets):
            report["error"] = f"{path}: row {row} (byte {offset}) is not in {index.name} ({len(offsets)} offsets)"
            return report
        if offsets[row] != offset:
            report["error"] = (f"{index.name}: offset {int(offsets[row])} of row {row} does not start a row of "
                               f"{path} (row {row} starts at byte {offset})")
            return report
        if not line.endswith(b"\n"):
            report["error"] = f"{path}: row {row} (byte {offset}) has no final newline: the file is truncated"
            return report
        columns = line[:-1].split(b"\t")
        key = columns[0].decode("utf-8", errors="replace")
        if keys is not None and keys[row] != key:
            report["error"] = f"{index.name}: row {row} is keyed {keys[row]!r} but holds {key!r}"
            return report
        if frame_column is None:
            try:
                frame_column = detect_frame_column([c.decode("ascii", errors="replace") for c in columns[:4]],
                                                   where=f"{path}: row {row}")
            except TSVError as err:
                report["error"] = str(err)
                return report
            report["frame_column"] = frame_column
        frames = columns[frame_column:]
        if not frames or frames == [b""]:
            report["error"] = f"{path}: row {row} ({key!r}) has no frames"
            return report
        frame_counts.append(len(frames))
        if decoder is not None:
            for number, frame in enumerate(frames):
                try:
                    decoder(frame)
                except Exception as err:  # any decoder failure is reported with its row
                    report["error"] = f"{path}: row {row} ({key!r}) frame {number} does not decode: {err}"
                    return report
    if row + 1 < len(offsets):
        report["error"] = f"{index.name}: lists {len(offsets)} rows but {path} has {row + 1}"
        return report
    counts = np.array(frame_counts or [0])
    report.update(rows=row + 1, frames=int(counts.sum()), min_frames=int(counts.min()),
                  max_frames=int(counts.max()), ok=True)
    return report
