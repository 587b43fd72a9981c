"""The data-preparation commands: `make-demo-data`, `extract-frames`, `check-parts`, `extract-images`,
`build-index`, `validate-tsv`, `convert-pickle`. Each checks its arguments, calls the library in
`violet_ds.data` and prints a summary; the exit code is 1 when nothing usable came out."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Literal, Optional

from violet_ds.data import convert
from violet_ds.data import tsv as tsv_files


def make_demo_data(out: str = "data/demo", num_videos: int = 300, num_images: int = 100, num_frames: int = 8,
                   render_frames: int = 16, size: int = 64, seed: int = 0, workers: int = 2,
                   vocab_size: int = 384, motion_captions: int = 0, num_sequences: int = 0,
                   force: bool = False) -> int:
    """Generate the synthetic demo dataset (videos, frame TSVs, annotations in every official format,
    WordPiece tokenizer); the layout is documented in violet_ds/data/demo.py.

    Args:
        out: output folder.
        num_videos: synthetic videos to render.
        num_images: still images for the image-text part.
        num_frames: frames extracted per video into the TSVs (the real extraction rule).
        render_frames: frames rendered per video (8 fps).
        size: frame size in pixels (square; rounded up to even for the mp4 encoder).
        seed: everything is a function of it.
        workers: processes for rendering and extraction.
        vocab_size: WordPiece vocabulary size cap (special + character tokens + whole words by frequency).
        motion_captions: motion-only captions per video added to the pretraining captions ("something
            moves left"): video-text matching and MLM can then only be solved from the motion.
        num_sequences: extra two-move videos in the pretraining captions only (train split), e.g. "a big red
            circle moves left then up": the captions that tie the order of words to the order of frames.
        force: delete an existing output folder first.
    """
    # imported when the command runs: the demo and extraction modules import torch, the other commands here do not
    from violet_ds.data import demo

    try:
        summary = demo.make_demo_data(out=out, num_videos=num_videos, num_images=num_images, num_frames=num_frames,
                                      render_frames=render_frames, size=size, seed=seed, workers=workers,
                                      vocab_size=vocab_size, motion_captions=motion_captions,
                                      num_sequences=num_sequences, force=force)
    except FileExistsError as refused:
        print(refused)
        return 1
    meta = summary.meta
    side = meta["arguments"]["size"]
    two_moves = f" + {num_sequences} two-move videos" if num_sequences else ""
    print(f"demo data in {summary.root}: {num_videos} videos{two_moves} ({num_frames} frames of {side}x{side} in "
          f"{len(meta['video_shards'])} shards), {num_images} images, {summary.annotation_files} annotation files, "
          f"vocabulary {meta['tokenizer_vocab_size']} ({summary.seconds:.1f}s)")
    return 0


def _print_extraction(report, out_dir: str, prefix: str) -> int:
    """The summary of an extraction (and its first failures); 1 when nothing was extracted and something failed."""
    prefix = report.prefix or prefix
    where = (f"part {report.part}/{report.num_parts} ({report.assigned} videos, files {prefix}_*): "
             if report.num_parts > 1 else "")
    repaired = f", {len(report.repaired)} shard(s) cut back to their last complete row" if report.repaired else ""
    print(f"{where}wrote {report.written} rows in {len(report.shards)} new shard(s), skipped {report.skipped} already "
          f"extracted, {len(report.failed)} failed{repaired} ({report.seconds:.1f}s)")
    for key, error in sorted(report.failed.items())[:20]:
        print(f"  failed {key}: {error}", file=sys.stderr)
    if report.failed:
        print(f"  full list: {Path(out_dir) / (prefix + '_failed.json')}", file=sys.stderr)
    return 1 if report.failed and not report.written and not report.skipped else 0


def extract_frames(videos: str, out_dir: str, num_frames: int = 5, fps: Optional[float] = None,
                   max_frames: int = 0, short_side: int = 224, quality: int = 90, shard_size: int = 1000,
                   prefix: str = "frames", workers: int = 2, seek: bool = True, with_keys: bool = False,
                   allow_mixed_settings: bool = False, part: Optional[int] = None,
                   num_parts: Optional[int] = None) -> int:
    """Videos -> N sampled JPEG frames per video -> TSV shards `{out_dir}/{prefix}_NNN.tsv` (+ .lineidx).

    Resumable (videos already in the shards are skipped); failures are reported in
    `{prefix}_failed.json` without stopping the run. With `--num_parts N` each of N runs (hosts, SLURM array
    tasks) extracts part K of the list into `{prefix}_pKKKofNNN_MMM.tsv`; `violet-ds check-parts` then checks
    the union.

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
        part: which part of the video list to extract, 0..num_parts-1 (default: SLURM_ARRAY_TASK_ID in a
            SLURM array task, else 0); a video's part is sha1(its id) mod num_parts.
        num_parts: split the video list into this many parts, one per run (default: the size of the SLURM
            array 0-(N-1) in an array task, else 1 = no split); give it when resubmitting one part alone.
    """
    # imported when the command runs: the extraction module imports torch, the other commands here do not
    from violet_ds.data import extract

    try:
        report = extract.extract_frames(videos, out_dir, num_frames=num_frames, fps=fps, max_frames=max_frames,
                                        short_side=short_side, quality=quality, shard_size=shard_size,
                                        prefix=prefix, workers=workers, seek=seek, with_keys=with_keys,
                                        allow_mixed_settings=allow_mixed_settings, part=part, num_parts=num_parts)
    except extract.PartError as refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    return _print_extraction(report, out_dir, prefix)


def check_parts(out_dir: str, prefix: str = "frames", videos: Optional[str] = None) -> int:
    """Check the parts of `extract-frames --num_parts N` as one dataset and list its shards.

    Every part must have finished (its `{prefix}_pKKKofNNN_done.json`) and be unchanged since, all parts must
    share their settings, and every video must be in exactly one row over all parts (or in a failures file).
    Prints one line per part and the problems; exits 1 naming the missing or incomplete parts. When all is
    well, writes `{prefix}_parts.json` (parts, shards, counts).

    Args:
        out_dir: the folder the parts wrote to.
        prefix: the `--prefix` the parts were given.
        videos: the `--videos` the parts were given: also check that every listed video is in its part.
    """
    from violet_ds.data import extract

    report = extract.check_parts(out_dir, prefix=prefix, videos=videos)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if not report.ok:
        return 1
    print(f"all {report.num_parts} parts complete: {report.rows} videos in {len(report.shards)} shards, each once; "
          f"{report.failed} failed. Read them with tsv: {Path(out_dir) / (prefix + '_*.tsv')} "
          f"(list in {report.manifest})")
    return 0


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
    # imported when the command runs: the extraction module imports torch, the other commands here do not
    from violet_ds.data import extract

    report = extract.extract_images(images, out_dir, short_side=short_side, quality=quality, shard_size=shard_size,
                                    prefix=prefix, workers=workers, allow_mixed_settings=allow_mixed_settings)
    return _print_extraction(report, out_dir, prefix)


def build_index(tsv: str, force: bool = False, with_keys: bool = False) -> int:
    """Write the `.lineidx` (byte offset of each row) of TSV files that have none.

    Args:
        tsv: a TSV path, a glob, or a comma-separated list of them.
        force: rebuild even when a `.lineidx` exists (e.g. after it went stale).
        with_keys: write `video_id<TAB>offset` lines (VIOLETv2 style) instead of bare offsets.
    """
    for path in tsv_files.resolve_tsv_paths(tsv):
        index = tsv_files.lineidx_path(path)
        if index.exists() and not force:
            print(f"{index}: exists (use --force to rebuild)")
            continue
        try:
            tsv_files.build_lineidx(path, with_keys=with_keys, progress=True)
        except tsv_files.TSVError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{index}: written")
    return 0


def validate_tsv(tsv: str, frame_column: Optional[int] = None, decode: bool = False) -> int:
    """Check TSV shards: every `.lineidx` offset starts a row, every row ends, count rows and frames.

    Prints one line per shard and the first bad row; exits 1 when any shard is bad.

    Args:
        tsv: a TSV path, a glob, or a comma-separated list of them.
        frame_column: first frame column (default: detected; 1 official, 2 VIOLETv2/LAVENDER).
        decode: also decode every JPEG frame (slow, catches corrupt frames).
    """
    status = 0
    total_rows = total_frames = 0
    for path in tsv_files.resolve_tsv_paths(tsv):
        report = tsv_files.validate_tsv(path, frame_column=frame_column, decode=decode)
        if report["ok"]:
            total_rows += report["rows"]
            total_frames += report["frames"]
            print(f"ok   {path}: {report['rows']} rows, {report['frames']} frames "
                  f"({report['min_frames']}-{report['max_frames']} per row, frames from column {report['frame_column']})")
        else:
            status = 1
            print(f"BAD  {report['error']}")
    print(f"total: {total_rows} rows, {total_frames} frames; {'all valid' if status == 0 else 'errors found'}")
    return status


def convert_pickle(src: str, out: Optional[str] = None, kind: Literal["auto", "frames", "vq"] = "auto") -> int:
    """Convert an official pickle with a restricted unpickler (numpy arrays only, never arbitrary code).

    Args:
        src: the `.pkl` file (frames `{id: [b64, ...]}` or VQ tokens `{id: int16 (N,h,w)}`).
        out: output path (default: `src` with `.tsv` for frames, `.npz` for VQ tokens).
        kind: what the pickle holds; `auto` looks at its first value.
    """
    try:
        result = convert.convert_pickle(src, out, kind)
    except (convert.ConvertError, OSError, ValueError, pickle.UnpicklingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{result.source} -> {result.target}: {result.videos} videos ({result.kind})")
    return 0
