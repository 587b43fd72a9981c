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
"""

from __future__ import annotations

import glob
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
    for path in sorted(out_dir.glob(f"{prefix}_*.tmp*")):
        match = re.search(r"\.tmp(\d+)$", path.name)
        if not match or not path.is_file():
            continue
        pid = int(match.group(1))
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


def run_extraction(inputs: Sequence[tuple[str, Path]], out_dir: Path, prefix: str, options: ExtractOptions,
                   shard_size: int = 1000, workers: int = 2, progress: bool = True,
                   with_keys: bool = False, allow_mixed: bool = False) -> ExtractReport:
    """Extract every input not already in `out_dir`'s shards; see the module docstring. Shards written with
    other row settings are refused unless `allow_mixed` (`check_shard_settings`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExtractReport()
    started = time.perf_counter()
    removed = remove_stale_temporaries(out_dir, prefix)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted run: "
              f"{', '.join(p.name for p in removed[:5])}{' ...' if len(removed) > 5 else ''}", file=sys.stderr)
    unusable = [(key, path) for key, path in inputs if "\t" in key or "\n" in key or "\r" in key]
    for key, path in unusable:
        report.failed[key] = "the file name contains a tab or newline, which a TSV row cannot hold: rename the file"
    inputs = [(key, path) for key, path in inputs if (key, path) not in unusable]
    done: set[str] = set()
    shards = existing_shards(out_dir, prefix)
    for shard in shards:
        try:
            done.update(TSVFile(shard).keys())
        except TSVError as err:
            raise TSVError(f"{shard}: existing shard is unreadable ({err}); remove it to re-extract its videos") from err
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
    report.seconds = time.perf_counter() - started
    return report


def _print_report(report: ExtractReport, out_dir: Path, prefix: str) -> int:
    print(f"wrote {report.written} rows in {len(report.shards)} new shard(s), skipped {report.skipped} already "
          f"extracted, {len(report.failed)} failed ({report.seconds:.1f}s)")
    for key, error in sorted(report.failed.items())[:20]:
        print(f"  failed {key}: {error}", file=sys.stderr)
    if report.failed:
        print(f"  full list: {out_dir / (prefix + '_failed.json')}", file=sys.stderr)
    return 1 if report.failed and not report.written and not report.skipped else 0


def extract_frames(videos: str, out_dir: str, num_frames: int = 5, fps: Optional[float] = None,
                   max_frames: int = 0, short_side: int = 224, quality: int = 90, shard_size: int = 1000,
                   prefix: str = "frames", workers: int = 2, seek: bool = True, with_keys: bool = False,
                   allow_mixed_settings: bool = False) -> int:
    """Videos -> N sampled JPEG frames per video -> TSV shards `{out_dir}/{prefix}_NNN.tsv` (+ .lineidx).

    Resumable (videos already in the shards are skipped); failures are reported in
    `{prefix}_failed.json` without stopping the run.

    Args:
        videos: a folder (searched recursively), a glob, a list file (`path` or `id<TAB>path` per line) or one video.
        out_dir: output folder for the shards.
        num_frames: frames per video, evenly spaced by the official rule int(len/(N+1)*(i+1)).
        fps: sample at this rate instead of a fixed count (VIMPAC); capped by max_frames.
        max_frames: with fps, keep at most this many frames (evenly thinned); 0 = no cap.
        short_side: resize so the shorter side has this many pixels (0 keeps the original size).
        quality: JPEG quality.
        shard_size: rows per TSV shard.
        prefix: shard file name prefix.
        workers: decoding processes.
        seek: jump to key frames near each sampled frame instead of decoding everything.
        with_keys: write `video_id<TAB>offset` .lineidx lines (VIOLETv2 style).
        allow_mixed_settings: add rows to shards written with other num_frames / fps / max_frames / short_side
            (recorded in `{prefix}_settings.json`); refused otherwise.
    """
    inputs = list_inputs(videos, VIDEO_EXTENSIONS)
    options = ExtractOptions(num_frames=num_frames, fps=fps, max_frames=max_frames, short_side=short_side,
                             quality=quality, seek=seek)
    out = Path(out_dir)
    report = run_extraction(inputs, out, prefix, options, shard_size, workers, with_keys=with_keys,
                            allow_mixed=allow_mixed_settings)
    return _print_report(report, out, prefix)


def extract_images(images: str, out_dir: str, short_side: int = 224, quality: int = 90, shard_size: int = 10000,
                   prefix: str = "images", workers: int = 2, allow_mixed_settings: bool = False) -> int:
    """Images (CC3M style) -> one-frame TSV rows `image_id<TAB>b64 JPEG` in shards `{prefix}_NNN.tsv`.

    Args:
        images: a folder (recursive), a glob, a list file (`path` or `id<TAB>path` per line) or one image.
        out_dir: output folder for the shards.
        short_side: resize so the shorter side has this many pixels (0 keeps the original size).
        quality: JPEG quality.
        shard_size: rows per TSV shard.
        prefix: shard file name prefix.
        workers: decoding processes.
        allow_mixed_settings: add rows to shards written with another short_side (recorded in
            `{prefix}_settings.json`); refused otherwise.
    """
    inputs = list_inputs(images, IMAGE_EXTENSIONS)
    options = ExtractOptions(short_side=short_side, quality=quality, images=True)
    out = Path(out_dir)
    report = run_extraction(inputs, out, prefix, options, shard_size, workers, allow_mixed=allow_mixed_settings)
    return _print_report(report, out, prefix)
