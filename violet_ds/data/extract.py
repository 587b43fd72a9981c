"""Frame extraction: videos (or images) -> sampled, resized JPEG frames -> TSV shards.

Sampling. `num_frames` mode follows the official extractor: of a video's `total` frames it keeps
`int(total / (N + 1) * (i + 1))` for i in 0..N-1. `fps` mode (VIMPAC) keeps one frame every
`native_fps / fps` frames, at most `max_frames` (evenly thinned when there are more).

Decoding uses PyAV. The frame count comes from the container, or from counting packets (no
decoding) when the container does not say. With `seek`, the decoder jumps to the key frame before a
sampled frame whenever that frame is far ahead of the current position, instead of decoding
everything in between; containers that cannot seek fall back to decoding straight through.

Shards `{prefix}_{NNN}.tsv` (+ `.lineidx`) are written through `TSVWriter` (temp file + rename),
so a shard on disk is always complete: a re-run reads the ids already in the shards, skips those
videos and writes new shards after the existing ones. Videos that fail (corrupt, empty, no video
stream, unsupported codec) are listed in `{prefix}_failed.json` and the run goes on.
`{prefix}_settings.json` records the settings the rows were extracted with (frames, fps, short side); a
run with other settings is refused before it adds rows (for shards written before that file existed,
the first row's frame count and size are compared), unless `--allow_mixed_settings true`.

Parts. `num_parts` N > 1 splits the video list over N independent runs (one per host or SLURM array task):
a video belongs to part `sha1(id) mod N`, so its part depends only on its id and N (a re-run, a re-ordered
or a grown list keeps every video in its part). Part K writes under the prefix `{prefix}_pKKKofNNN`:
shards `{prefix}_pKKKofNNN_MMM.tsv` (a `{prefix}_*.tsv` glob reads every part), its own failures and
settings files, and `{prefix}_pKKKofNNN_done.json` once it has finished (removed when it starts). A run
refuses an output folder that holds shards of the same prefix split another way. `check_parts` checks
the union: every part finished and unchanged since, every video in exactly one row (or failed).

Resume. Shards are renamed into place only when complete, so a killed run leaves complete shards plus
temporaries of its current shard; the next run deletes the temporaries, skips the videos of the complete
shards and extracts the rest. A shard that does not end with a complete row (a copy cut short, a full
disk) is cut back to its last complete row and re-indexed; a shard without `.lineidx` is re-indexed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from violet_ds.data.frames import encode_b64_jpeg
from violet_ds.data.tsv import TSVError, TSVFile, TSVWriter

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif", ".3gp", ".ts"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
LIST_EXTENSIONS = {".txt", ".lst", ".list", ".csv"}


class VideoDecodeError(RuntimeError):
    """A video that yields no usable frames."""


# ---------------------------------------------------------------- inputs

def list_inputs(spec: str, extensions: set[str]) -> list[tuple[str, Path]]:
    """A folder (recursive), a glob, a list file (`path` or `id<TAB>path` per line) or one file ->
    sorted (id, path) pairs; the id is the file name without extension unless the list gives one."""
    path = Path(spec)
    pairs: list[tuple[str, Path]] = []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        pairs = [(p.stem, p) for p in files]
    elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        for number, line in enumerate(path.read_text().splitlines()):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise ValueError(f"{path}: line {number}: expected `path` or `id<TAB>path`")
            item = Path(parts[-1])
            item = item if item.is_absolute() else path.parent / item
            pairs.append((parts[0] if len(parts) == 2 else item.stem, item))
    elif path.is_file():
        pairs = [(path.stem, path)]
    elif any(ch in spec for ch in "*?["):
        pairs = [(Path(p).stem, Path(p)) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    else:
        raise FileNotFoundError(f"no such folder, file, list or glob: {spec}")
    seen: dict[str, Path] = {}
    for key, item in pairs:
        if "\t" in key or "\n" in key or "\r" in key:
            # not representable in a TSV row: run_extraction reports it in the failures file and skips it
            continue
        if key in seen:
            raise ValueError(f"duplicate id {key!r}: {seen[key]} and {item} (ids are file names without extension)")
        seen[key] = item
    if not pairs:
        raise FileNotFoundError(f"no input files found in {spec} (extensions {sorted(extensions)})")
    return pairs


# ---------------------------------------------------------------- sampling rules

def official_indices(total: int, num_frames: int) -> list[int]:
    """The official extractor's rule: frame `int(total / (N + 1) * (i + 1))` for i < N."""
    return [min(total - 1, int(total / (num_frames + 1) * (i + 1))) for i in range(num_frames)]


def fps_indices(total: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """One frame every `native_fps / fps` frames, evenly thinned to at most `max_frames`."""
    step = max(native_fps / fps, 1.0) if native_fps > 0 else 1.0
    indices = np.unique(np.floor(np.arange(0, total, step)).astype(np.int64))
    if max_frames > 0 and len(indices) > max_frames:
        indices = indices[np.linspace(0, len(indices) - 1, max_frames).round().astype(np.int64)]
    return indices.tolist()


def output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    if short_side <= 0:
        return height, width
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


# ---------------------------------------------------------------- decoding one video

def _count_frames(path: Path) -> tuple[int, float]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames
        if total <= 0:
            # the container does not say: count packets (demuxing only, no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
        return int(total), rate


def _to_rgb(frame, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()


# clips up to this long get a key-frame index (demuxing only) so that a seek happens only where it skips
# decoding; longer ones seek whenever the next frame is more than `jump` frames away (it always pays there)
KEYFRAME_INDEX_MAX_SECONDS = 300.0


def _keyframe_indices(container, stream, start: int, time_base: float, rate: float, total: int) -> Optional[list]:
    """Frame indices of the key frames of a short clip (demuxing, no decoding); None for long clips."""
    if total / rate > KEYFRAME_INDEX_MAX_SECONDS:
        return None
    found = []
    try:
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.pts is not None:
                found.append(int(round((packet.pts - start) * time_base * rate)))
        container.seek(start, stream=stream, backward=True, any_frame=False)
    except Exception:  # an odd container: fall back to the distance rule
        return None
    return sorted(set(found)) or None


def _seek_pays(keyframes: Optional[list], target: int, position: int, jump: int) -> bool:
    """Seek when it skips decoding: the key frame at or before `target` lies beyond the current position
    (a seek lands there and decodes forward). Without an index: when `target` is over `jump` frames away."""
    if keyframes is None:
        return target - position > jump
    before = [k for k in keyframes if k <= target]
    return bool(before) and before[-1] > position + 1


def read_video_frames(path: Path, num_frames: int = 5, fps: Optional[float] = None, max_frames: int = 0,
                      short_side: int = 224, seek: bool = True) -> list[np.ndarray]:
    """Decode the sampled frames of one video -> list of uint8 `(H, W, 3)` RGB arrays."""
    import av

    if path.stat().st_size == 0:
        raise VideoDecodeError("empty file")
    total, rate = _count_frames(path)
    if total <= 0:
        raise VideoDecodeError("zero frames")
    targets = fps_indices(total, rate, fps, max_frames) if fps else official_indices(total, num_frames)
    wanted = sorted(set(targets))
    picked: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = float(stream.time_base) if stream.time_base else 0.0
        start = stream.start_time or 0
        can_seek = seek and rate > 0 and time_base > 0
        # jump only when the next wanted frame is further than about two seconds of decoding away
        jump = max(int(rate * 2), 16) if rate > 0 else total

        def frame_index(frame, fallback: int) -> int:
            if frame.pts is None or not time_base or not rate:
                return fallback
            return int(round((frame.pts - start) * time_base * rate))

        keyframes = _keyframe_indices(container, stream, start, time_base, rate, total) if can_seek else None
        position = -1
        decoder: Iterator = container.decode(stream)
        size: Optional[tuple[int, int]] = None
        last: Optional[np.ndarray] = None
        pending = list(wanted)
        sought = -1
        while pending:
            target = pending[0]
            if can_seek and target != sought and _seek_pays(keyframes, target, position, jump):
                sought = target  # one jump per target: the key frame may lie far before it
                try:
                    container.seek(int(start + target / rate / time_base), stream=stream, backward=True, any_frame=False)
                    decoder = container.decode(stream)
                    position = -2  # unknown until the next frame's pts
                except (av.error.FFmpegError, OSError, ValueError):
                    can_seek = False
            try:
                frame = next(decoder)
            except StopIteration:
                break
            except av.error.FFmpegError as err:
                if picked or last is not None:
                    break  # a damaged tail: keep what decoded
                raise VideoDecodeError(f"decoding failed: {err}") from err
            position = frame_index(frame, position + 1)
            if size is None:
                size = output_size(frame.height, frame.width, short_side)
            if pending[0] <= position:
                last = _to_rgb(frame, size)
                while pending and pending[0] <= position:
                    picked[pending.pop(0)] = last
        if not picked:
            raise VideoDecodeError("zero decodable frames")
    # the metadata may promise more frames than decode: later targets reuse the last frame
    final = picked[max(picked)]
    return [picked.get(index, final) for index in targets]


def read_image(path: Path, short_side: int = 224) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise VideoDecodeError("empty file")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            height, width = output_size(image.height, image.width, short_side)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            return np.asarray(image)
    except (UnidentifiedImageError, OSError) as err:
        raise VideoDecodeError(f"not a readable image ({err})") from err


# ---------------------------------------------------------------- worker

@dataclass
class ExtractOptions:
    num_frames: int = 5
    fps: Optional[float] = None
    max_frames: int = 0
    short_side: int = 224
    quality: int = 90
    seek: bool = True
    images: bool = False


def _extract_one(job: tuple[str, str, ExtractOptions]) -> tuple[str, Optional[list[str]], Optional[str]]:
    key, path_str, options = job
    path = Path(path_str)
    try:
        if options.images:
            arrays = [read_image(path, options.short_side)]
        else:
            arrays = read_video_frames(path, options.num_frames, options.fps, options.max_frames,
                                       options.short_side, options.seek)
        return key, [encode_b64_jpeg(a, options.quality) for a in arrays], None
    except Exception as err:  # noqa: BLE001 -- PyAV/Pillow raise many types; each failure is reported, the run goes on
        return key, None, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------- driver

@dataclass
class ExtractReport:
    written: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    part: int = 0
    num_parts: int = 1
    prefix: str = ""        # the file prefix this run wrote (`{prefix}_pKKKofNNN` for a part)
    assigned: int = 0       # inputs of this part (all inputs when num_parts is 1)
    repaired: list[str] = field(default_factory=list)  # shards cut back to their last complete row


SHARD_PATTERN = r"^{prefix}_(\d+)\.tsv$"
# `{prefix}_settings.json` next to the shards: the extraction settings their rows were written with
SETTINGS_FILE = "{prefix}_settings.json"
SETTINGS_FORMAT = "violet_ds-shard-settings/1"


def row_settings(options: ExtractOptions) -> dict:
    """The options that decide what a row holds (which frames, their size); JPEG quality and seeking do not."""
    if options.images:
        return {"kind": "image", "short_side": options.short_side}
    if options.fps is None:
        return {"kind": "video", "num_frames": options.num_frames, "short_side": options.short_side}
    return {"kind": "video", "fps": options.fps, "max_frames": options.max_frames, "short_side": options.short_side}


def _describe(settings: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in settings.items() if key != "kind")


def _settings_of_row(shard: Path) -> dict:
    """What the first row of a shard written without a settings file shows: its frame count and short side."""
    import base64
    import io

    from PIL import Image

    tsv = TSVFile(shard)
    try:
        if not len(tsv):
            return {}
        _, frames = tsv.frames(0)
        with Image.open(io.BytesIO(base64.b64decode(frames[0]))) as image:
            return {"num_frames": len(frames), "short_side": min(image.size)}
    except Exception:  # noqa: BLE001 -- an unreadable first row says nothing about the settings
        return {}
    finally:
        tsv.close()


def check_shard_settings(out_dir: Path, prefix: str, options: ExtractOptions, shards: Sequence[Path],
                         allow_mixed: bool = False) -> None:
    """Refuse to add rows extracted with other settings than the existing shards' (`{prefix}_settings.json`,
    or for shards written before it, what their first row shows) unless `allow_mixed`; then record them."""
    path = out_dir / SETTINGS_FILE.format(prefix=prefix)
    wanted = row_settings(options)
    recorded: list = []
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())["settings"]
            if not isinstance(recorded, list) or not all(isinstance(item, dict) for item in recorded):
                raise TypeError("`settings` is not a list of objects")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: unreadable ({type(error).__name__}: {error}); it records the settings of "
                             f"the shards {prefix}_*.tsv: fix it, or delete it to record this run's") from None
        mismatch = None if wanted in recorded else "; ".join(_describe(item) for item in recorded)
    elif shards:
        seen = _settings_of_row(shards[0])
        shown = {"num_frames": seen.get("num_frames") if not options.images and options.fps is None else None,
                 "short_side": seen.get("short_side") if options.short_side > 0 else None}
        expected = {"num_frames": options.num_frames, "short_side": options.short_side}
        different = {key: value for key, value in shown.items() if value is not None and value != expected[key]}
        mismatch = (f"{', '.join(f'{key} {value}' for key, value in different.items())} (their first row, "
                    f"{shards[0].name})") if different else None
    else:
        mismatch = None
    if mismatch is not None:
        held = f"{out_dir}/{prefix}_*.tsv hold rows extracted with {mismatch}; this run asks for {_describe(wanted)}"
        if not allow_mixed:
            raise ValueError(f"{held}: adding its rows would mix two settings in one dataset. Extract into another "
                             "--out_dir or --prefix, use the same settings, or pass --allow_mixed_settings true")
        print(f"warning: {held}; mixing them (--allow_mixed_settings)", file=sys.stderr)
    if wanted not in recorded:
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"format": SETTINGS_FORMAT, "settings": recorded + [wanted]}, indent=1) + "\n")
        os.replace(tmp, path)


def existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    pattern = re.compile(SHARD_PATTERN.format(prefix=re.escape(prefix)))
    return sorted(p for p in out_dir.glob(f"{prefix}_*.tsv") if pattern.match(p.name))


def remove_stale_temporaries(out_dir: Path, prefix: str) -> list[Path]:
    """Delete `{prefix}_*.tmpPID` files (shards and indexes being written) whose process is gone."""
    removed = []
    # this prefix's own files only: another part's (`{prefix}_pKKKofNNN_...`) may be written on another host
    own = re.compile(rf"^{re.escape(prefix)}_(\d+\.tsv|\d+\.lineidx|settings\.json)\.tmp(\d+)$")
    for path in sorted(out_dir.glob(f"{prefix}_*.tmp*")):
        match = own.match(path.name)
        if not match or not path.is_file():
            continue
        pid = int(match.group(2))
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass
        if not alive or pid == os.getpid():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def recover_shard(shard: Path) -> Optional[str]:
    """Make an existing shard readable for a resume; returns what was done (None when it was fine).

    A shard without `.lineidx` is re-indexed. One that does not end with a complete row is cut back to its
    last complete row (its videos after that are extracted again) and re-indexed; one with no complete row
    is deleted. An index that disagrees with its shard's tail is rebuilt."""
    from violet_ds.data.tsv import build_lineidx, lineidx_path

    index = lineidx_path(shard)
    with_keys = index.is_file() and "\t" in index.read_text()[:4096].split("\n", 1)[0]
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        handle.seek(max(size - 1, 0))
        last = handle.read(1)
    if size and last != b"\n":
        # find the end of the last complete row, reading backwards
        cut, block = 0, 1 << 20
        with open(shard, "rb") as handle:
            position = size
            while position > 0:
                start = max(position - block, 0)
                handle.seek(start)
                found = handle.read(position - start).rfind(b"\n")
                if found >= 0:
                    cut = start + found + 1
                    break
                position = start
        if cut == 0:
            shard.unlink()
            index.unlink(missing_ok=True)
            return f"{shard.name}: no complete row, deleted"
        with open(shard, "r+b") as handle:
            handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())
        build_lineidx(shard, with_keys=with_keys)
        return f"{shard.name}: cut from {size} to {cut} bytes (its last row was incomplete), re-indexed"
    if not size:
        shard.unlink()
        index.unlink(missing_ok=True)
        return f"{shard.name}: empty, deleted"
    if not index.is_file():
        build_lineidx(shard, with_keys=with_keys)
        return f"{shard.name}: no {index.name}, re-indexed"
    tsv = TSVFile(shard)
    try:
        if len(tsv):
            tsv.read_bytes(len(tsv) - 1)  # the last indexed row ends exactly at the end of the file
    except TSVError:
        build_lineidx(shard, with_keys=with_keys)
        return f"{shard.name}: {index.name} did not match the shard, re-indexed"
    finally:
        tsv.close()
    return None


# ---------------------------------------------------------------- parts

PART_TAG = "p{part:03d}of{num_parts:03d}"
PART_SHARD_PATTERN = r"^{prefix}_p(\d+)of(\d+)_(\d+)\.tsv$"
DONE_FILE = "{prefix}_done.json"          # with the part's prefix: the part finished
PARTS_FILE = "{prefix}_parts.json"        # written by check_parts: the union of every part
DONE_FORMAT = "violet_ds-extract-part/1"
PARTS_FORMAT = "violet_ds-extract-parts/1"


class PartError(ValueError):
    """Part numbers that cannot be used (out of range, a SLURM array that is not 0..N-1)."""


def part_of(key: str, num_parts: int) -> int:
    """The part of video `key` among `num_parts`: sha1(id) mod N, independent of the list it comes in."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % num_parts


def split_inputs(inputs: Sequence[tuple[str, Path]], part: int, num_parts: int) -> list[tuple[str, Path]]:
    """The inputs of part `part` of `num_parts` (all of them for one part), in their listed order."""
    if num_parts == 1:
        return list(inputs)
    return [(key, path) for key, path in inputs if part_of(key, num_parts) == part]


def part_prefix(prefix: str, part: int, num_parts: int) -> str:
    """File prefix of a part's outputs: `prefix` itself for one part, else `{prefix}_pKKKofNNN`."""
    return prefix if num_parts == 1 else f"{prefix}_{PART_TAG.format(part=part, num_parts=num_parts)}"


def resolve_part(part: Optional[int] = None, num_parts: Optional[int] = None,
                 environ: Optional[dict] = None) -> tuple[int, int]:
    """(part, num_parts) from the arguments, else from a SLURM array task, else (0, 1).

    In an array task the part is `SLURM_ARRAY_TASK_ID` and the number of parts, unless given, the array's
    size, which needs an array of 0..N-1 (`--array=0-7`); a task resubmitted alone (`--array=3`) must be given
    `num_parts`."""
    env = os.environ if environ is None else environ
    task = env.get("SLURM_ARRAY_TASK_ID")
    if num_parts is None:
        if part is not None:
            raise PartError(f"--part {part} needs --num_parts")
        if task is None:
            return 0, 1
        count = env.get("SLURM_ARRAY_TASK_COUNT")
        low, high = env.get("SLURM_ARRAY_TASK_MIN"), env.get("SLURM_ARRAY_TASK_MAX")
        if count is None and low is not None and high is not None:
            count = str(int(high) - int(low) + 1)
        if count is None or low not in (None, "0") or (high is not None and int(high) != int(count) - 1) \
                or env.get("SLURM_ARRAY_TASK_STEP", "1") != "1":
            raise PartError(f"SLURM array task {task} of an array {low}-{high} ({count} tasks): the part number is "
                            "SLURM_ARRAY_TASK_ID, so the number of parts follows from the array only for an array "
                            "0-(N-1); pass --num_parts N (e.g. when resubmitting one part with --array=K)")
        num_parts = int(count)
    if part is None:
        if num_parts == 1:
            part = 0
        elif task is None:
            raise PartError(f"--num_parts {num_parts} needs --part K (0..{num_parts - 1}) outside a SLURM array task")
        else:
            part = int(task)
    if num_parts < 1:
        raise PartError(f"--num_parts must be at least 1, got {num_parts}")
    if not 0 <= part < num_parts:
        raise PartError(f"part {part} is not among 0..{num_parts - 1} (--num_parts {num_parts})")
    return part, num_parts


def _layouts(out_dir: Path, prefix: str) -> dict[int, list[Path]]:
    """Shards of `prefix` in `out_dir` by number of parts (1: the unsplit `{prefix}_NNN.tsv`)."""
    found: dict[int, list[Path]] = {}
    plain = existing_shards(out_dir, prefix)
    if plain:
        found[1] = plain
    pattern = re.compile(PART_SHARD_PATTERN.format(prefix=re.escape(prefix)))
    for path in sorted(out_dir.glob(f"{prefix}_p*of*_*.tsv")):
        match = pattern.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(path)
    return found


def _ids_digest(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_extraction(inputs: Sequence[tuple[str, Path]], out_dir: Path, prefix: str, options: ExtractOptions,
                   shard_size: int = 1000, workers: int = 2, progress: bool = True,
                   with_keys: bool = False, allow_mixed: bool = False, part: int = 0,
                   num_parts: int = 1) -> ExtractReport:
    """Extract every input (of part `part` of `num_parts`) not already in `out_dir`'s shards; see the module
    docstring. Shards written with other row settings are refused unless `allow_mixed` (`check_shard_settings`)."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise PartError(f"part {part} of {num_parts}: need 0 <= part < num_parts")
    out_dir.mkdir(parents=True, exist_ok=True)
    base, prefix = prefix, part_prefix(prefix, part, num_parts)
    report = ExtractReport(part=part, num_parts=num_parts, prefix=prefix)
    started = time.perf_counter()
    other = {count: paths for count, paths in _layouts(out_dir, base).items() if count != num_parts}
    if other:
        count, paths = sorted(other.items())[0]
        split = "unsplit" if count == 1 else f"split into {count} parts"
        raise PartError(f"{out_dir} holds shards of {base} {split} ({paths[0].name}, {len(paths)} shard(s)); this run "
                        f"is split into {num_parts}: its videos would be extracted a second time. Use "
                        f"{'no --num_parts' if count == 1 else f'--num_parts {count}'}, or another --out_dir or "
                        "--prefix")
    done_file = out_dir / DONE_FILE.format(prefix=prefix)
    done_file.unlink(missing_ok=True)  # the part is not finished while it runs
    removed = remove_stale_temporaries(out_dir, prefix)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted run: "
              f"{', '.join(p.name for p in removed[:5])}{' ...' if len(removed) > 5 else ''}", file=sys.stderr)
    inputs = split_inputs(inputs, part, num_parts)
    report.assigned = len(inputs)
    unusable = [(key, path) for key, path in inputs if "\t" in key or "\n" in key or "\r" in key]
    for key, path in unusable:
        report.failed[key] = "the file name contains a tab or newline, which a TSV row cannot hold: rename the file"
    inputs = [(key, path) for key, path in inputs if (key, path) not in unusable]
    done: set[str] = set()
    for shard in existing_shards(out_dir, prefix):
        try:
            repaired = recover_shard(shard)
        except (OSError, TSVError) as err:
            raise TSVError(f"{shard}: existing shard is unreadable ({err}); remove it to re-extract its videos") from err
        if repaired:
            report.repaired.append(repaired)
            print(f"resuming: {repaired}", file=sys.stderr)
    shards = existing_shards(out_dir, prefix)
    shard_keys: list[str] = []
    for shard in shards:
        tsv = TSVFile(shard)
        try:
            shard_keys.extend(tsv.keys())
        except TSVError as err:
            raise TSVError(f"{shard}: existing shard is unreadable ({err}); remove it to re-extract its videos") from err
        finally:
            tsv.close()
    done.update(shard_keys)
    check_shard_settings(out_dir, prefix, options, shards, allow_mixed)
    next_part = max((int(re.findall(r"(\d+)\.tsv$", s.name)[0]) for s in shards), default=-1) + 1
    todo = [(key, path) for key, path in inputs if key not in done]
    report.skipped = len(inputs) - len(todo)
    jobs = [(key, str(path), options) for key, path in todo]

    results: Iterable
    pool = None
    if workers > 1 and len(jobs) > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers)
        results = pool.imap(_extract_one, jobs, chunksize=1)  # ordered: shards are deterministic
    else:
        results = map(_extract_one, jobs)
    if progress:
        from violet_ds.progress import progress as tqdm  # a bar on terminals, lines in log files

        results = tqdm(results, total=len(jobs), desc=f"extracting -> {out_dir}/{prefix}_*.tsv", unit="file")
    writer: Optional[TSVWriter] = None
    try:
        for key, frames, error in results:
            if error is not None:
                report.failed[key] = error
                continue
            if writer is None:
                writer = TSVWriter(out_dir / f"{prefix}_{next_part:03d}.tsv", with_keys=with_keys)
                next_part += 1
            writer.write([key, *frames])
            report.written += 1
            if writer.rows >= shard_size:
                writer.close()
                report.shards.append(str(writer.path))
                writer = None
        if writer is not None:
            writer.close()
            report.shards.append(str(writer.path))
            writer = None
    finally:
        if writer is not None:
            writer.abort()  # interrupted: the partial shard is dropped, a re-run redoes its videos
        if pool is not None:
            pool.terminate()
            pool.join()
    failed_path = out_dir / f"{prefix}_failed.json"
    if report.failed:
        paths = {**dict(unusable), **dict(todo)}
        failed_path.write_text(json.dumps({k: {"path": str(paths[k]), "error": e}
                                           for k, e in sorted(report.failed.items())}, indent=1))
    elif failed_path.exists():
        failed_path.unlink()
    if num_parts > 1:
        rows = shard_keys + [key for key in _written_keys(report.shards)]
        _write_json(done_file, {
            "format": DONE_FORMAT, "prefix": base, "part": part, "num_parts": num_parts, "split": "sha1(id) mod N",
            "videos": report.assigned, "rows": len(rows), "failed": len(report.failed),
            "shards": [p.name for p in existing_shards(out_dir, prefix)], "settings": row_settings(options),
            "contents_sha256": _ids_digest(set(rows) | set(report.failed))})
    report.seconds = time.perf_counter() - started
    return report


def _written_keys(shards: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for shard in shards:
        tsv = TSVFile(shard)
        keys.extend(tsv.keys())
        tsv.close()
    return keys


def extract_frames(videos: str, out_dir: str, num_frames: int = 5, fps: Optional[float] = None,
                   max_frames: int = 0, short_side: int = 224, quality: int = 90, shard_size: int = 1000,
                   prefix: str = "frames", workers: int = 2, seek: bool = True, with_keys: bool = False,
                   allow_mixed_settings: bool = False, part: Optional[int] = None,
                   num_parts: Optional[int] = None) -> ExtractReport:
    """Videos -> N sampled JPEG frames per video -> TSV shards `{out_dir}/{prefix}_NNN.tsv` (+ .lineidx);
    `violet-ds extract-frames` documents the arguments. Resumable; failures are listed in the report and in
    `{prefix}_failed.json`. `part` / `num_parts` (default: the SLURM array task, else the whole list) extract
    one part of the list into `{prefix}_pKKKofNNN_MMM.tsv`; `check_parts` checks the union."""
    part, num_parts = resolve_part(part, num_parts)
    inputs = list_inputs(videos, VIDEO_EXTENSIONS)
    options = ExtractOptions(num_frames=num_frames, fps=fps, max_frames=max_frames, short_side=short_side,
                             quality=quality, seek=seek)
    return run_extraction(inputs, Path(out_dir), prefix, options, shard_size, workers, with_keys=with_keys,
                          allow_mixed=allow_mixed_settings, part=part, num_parts=num_parts)


# ---------------------------------------------------------------- the union of the parts

@dataclass
class PartsReport:
    num_parts: int = 0
    lines: list[str] = field(default_factory=list)      # one per part: its state and counts
    problems: list[str] = field(default_factory=list)   # empty: every part complete, every video once
    rows: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    manifest: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _failed_keys(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object of failed videos")
    return data


def check_parts(out_dir: str, prefix: str = "frames", videos: Optional[str] = None, write: bool = True) -> PartsReport:
    """Check that the parts of a split extraction make one dataset: every part finished (its done file) and
    unchanged since (the ids in its shards and failures file are the ones it finished with), all parts
    extracted with the same settings, and every video in exactly one row over all parts, or failed. With
    `videos` (the list given to the parts), also that every listed video is in its part. When all is well
    (and `write`), `{prefix}_parts.json` lists the parts, their shards and the counts."""
    root = Path(out_dir)
    report = PartsReport()
    if not root.is_dir():
        report.problems.append(f"{root}: no such folder")
        return report
    layouts = _layouts(root, prefix)
    done_pattern = re.compile(rf"^{re.escape(prefix)}_p(\d+)of(\d+)_done\.json$")
    counts = set(layouts) - {1}
    for path in root.glob(f"{prefix}_p*of*_done.json"):
        match = done_pattern.match(path.name)
        if match:
            counts.add(int(match.group(2)))
    if not counts:
        report.problems.append(f"{root} holds no parts of {prefix} ({prefix}_pKKKofNNN_MMM.tsv, "
                               f"{prefix}_pKKKofNNN_done.json): run `violet-ds extract-frames --num_parts N` first")
        return report
    if len(counts) > 1:
        report.problems.append(f"{root} holds parts of {prefix} from splits into {sorted(counts)} parts: one dataset "
                               "must come from one split; delete the shards of the others")
        return report
    num_parts = report.num_parts = counts.pop()
    if 1 in layouts:
        report.problems.append(f"{root} also holds unsplit shards {prefix}_NNN.tsv ({layouts[1][0].name}, ...), which "
                               f"a {prefix}_*.tsv glob reads too: move them away")
    by_part: dict[int, list[Path]] = {}
    pattern = re.compile(PART_SHARD_PATTERN.format(prefix=re.escape(prefix)))
    for path in layouts.get(num_parts, []):
        by_part.setdefault(int(pattern.match(path.name).group(1)), []).append(path)
    seen: dict[str, str] = {}          # video id -> the shard holding it
    duplicates: list[str] = []
    failed_of: dict[str, int] = {}
    settings: dict[str, list[int]] = {}
    parts_out = []
    unfinished = False
    for part in range(num_parts):
        own = part_prefix(prefix, part, num_parts)
        shards = by_part.get(part, [])
        done_path = root / DONE_FILE.format(prefix=own)
        name = f"part {part}/{num_parts} ({own})"
        rerun = f"rerun it (it resumes): `violet-ds extract-frames ... --part {part} --num_parts {num_parts}`"
        if not done_path.is_file():
            state = (f"incomplete: {len(shards)} shard(s) but no {done_path.name} (killed, failed or still running)"
                     if shards else f"missing: no shards and no {done_path.name} (not run yet, or it stopped before "
                                    "its first shard)")
            report.lines.append(f"{name}: {state}")
            unfinished = True
            report.problems.append(f"{name} is {state.split(':')[0]}; {rerun}")
            continue
        try:
            done = json.loads(done_path.read_text())
            failed = _failed_keys(root / f"{own}_failed.json")
            keys: list[str] = []
            for shard in shards:
                tsv = TSVFile(shard)
                try:
                    shard_keys = tsv.keys()
                    if len(tsv):
                        tsv.read_bytes(len(tsv) - 1)  # the shard ends with a complete row
                finally:
                    tsv.close()
                keys.extend(shard_keys)
                for key in shard_keys:
                    if key in seen:
                        duplicates.append(f"{key!r} in {seen[key]} and {shard.name}")
                    else:
                        seen[key] = shard.name
        except (OSError, ValueError) as err:  # TSVError is a ValueError
            report.lines.append(f"{name}: unreadable")
            report.problems.append(f"{name}: {err}; delete the bad file and {rerun}")
            continue
        for key in failed:
            failed_of[key] = part
        changed = []
        if done.get("shards") != [p.name for p in shards]:
            changed.append(f"its shards are {[p.name for p in shards]}, it finished with {done.get('shards')}")
        if done.get("contents_sha256") != _ids_digest(set(keys) | set(failed)):
            changed.append("the video ids in its shards and failures file are not the ones it finished with")
        if changed:
            report.lines.append(f"{name}: changed since it finished")
            report.problems.append(f"{name} changed since it finished ({'; '.join(changed)}); {rerun}")
            continue
        settings.setdefault(json.dumps(done.get("settings"), sort_keys=True), []).append(part)
        report.rows += len(keys)
        report.failed += len(failed)
        report.shards += [p.name for p in shards]
        parts_out.append({"part": part, "prefix": own, "videos": done.get("videos"), "rows": len(keys),
                          "failed": len(failed), "shards": [p.name for p in shards]})
        report.lines.append(f"{name}: complete, {len(keys)} row(s) in {len(shards)} shard(s), {len(failed)} failed")
    if duplicates:
        report.problems.append(f"{len(duplicates)} video(s) in more than one row: {'; '.join(duplicates[:10])}"
                               f"{' ...' if len(duplicates) > 10 else ''}")
    both = sorted(set(failed_of) & set(seen))
    if both:
        report.problems.append(f"{len(both)} video(s) both in a shard and in a failures file: {both[:10]}")
    if len(settings) > 1:
        report.problems.append("the parts were extracted with different settings: " + "; ".join(
            f"parts {parts}: {_describe(json.loads(item) or {})}" for item, parts in settings.items()))
    if videos is not None and not unfinished:
        missing, misplaced = [], []
        for key, _ in list_inputs(videos, VIDEO_EXTENSIONS):
            want = part_of(key, num_parts)
            where = seen.get(key)
            if where is None and key not in failed_of:
                missing.append(f"{key!r} (part {want})")
            elif (where is not None and not where.startswith(part_prefix(prefix, want, num_parts) + "_")) or \
                    (where is None and failed_of[key] != want):
                misplaced.append(f"{key!r} (belongs to part {want}, found in {where or 'a failures file'})")
        if missing:
            report.problems.append(f"{len(missing)} listed video(s) in no shard and no failures file: "
                                   f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; rerun their parts")
        if misplaced:
            report.problems.append(f"{len(misplaced)} video(s) in another part than theirs: "
                                   f"{', '.join(misplaced[:10])}")
    if report.ok and write:
        manifest = root / PARTS_FILE.format(prefix=prefix)
        _write_json(manifest, {"format": PARTS_FORMAT, "prefix": prefix, "num_parts": num_parts,
                               "rows": report.rows, "failed": report.failed, "tsv": str(root / f"{prefix}_*.tsv"),
                               "parts": parts_out, "shards": report.shards})
        report.manifest = str(manifest)
    return report


def extract_images(images: str, out_dir: str, short_side: int = 224, quality: int = 90, shard_size: int = 10000,
                   prefix: str = "images", workers: int = 2, allow_mixed_settings: bool = False) -> ExtractReport:
    """Images (CC3M style) -> one-frame TSV rows `image_id<TAB>b64 JPEG` in shards `{prefix}_NNN.tsv`;
    `violet-ds extract-images` documents the arguments."""
    inputs = list_inputs(images, IMAGE_EXTENSIONS)
    options = ExtractOptions(short_side=short_side, quality=quality, images=True)
    return run_extraction(inputs, Path(out_dir), prefix, options, shard_size, workers,
                          allow_mixed=allow_mixed_settings)
