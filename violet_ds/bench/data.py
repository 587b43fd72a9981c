"""Data-loader throughput (clips/s) per JPEG decoder (`violet-ds bench data`).

Runs the real `VideoDataset` + `DataLoader` (worker processes, pinned memory when CUDA is present,
`collate`) over a frame TSV, once per decoder, and also times bare decoding (frames/s, one
process). Without `--tsv` it writes a synthetic TSV of 320x240 JPEG frames (textured, moving
content, quality 90) to a temporary folder so the command runs anywhere.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from violet_ds.bench.meta import bench_meta, write_results
from violet_ds.data.datasets import VideoDataset, collate
from violet_ds.data.extract import read_video_frames
from violet_ds.data.frames import available_decoders, decode_jpeg, encode_b64_jpeg, resolve_decoder
from violet_ds.data.tsv import TSVFile, TSVWriter, resolve_tsv_paths


def write_synthetic_tsv(path: Path, rows: int = 64, frames: int = 8, height: int = 240, width: int = 320,
                        quality: int = 90, seed: int = 0) -> Path:
    """A TSV of textured moving frames (JPEG sizes close to real 320x240 video frames)."""
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    with TSVWriter(path) as writer:
        for row in range(rows):
            phase = rng.uniform(0, 6.28, size=3)
            frequency = rng.uniform(0.01, 0.06, size=3)
            texture = rng.normal(0, 18, size=(height, width, 3)).astype(np.float32)
            columns = [f"bench{row:05d}"]
            for frame in range(frames):
                shift = frame * 4.0
                image = np.stack([127 + 90 * np.sin((grid_x + shift) * frequency[c] + grid_y * frequency[(c + 1) % 3]
                                                    + phase[c]) for c in range(3)], axis=-1)
                columns.append(encode_b64_jpeg(np.clip(image + texture, 0, 255).astype(np.uint8), quality))
            writer.write(columns)
    return path


def time_decoder(frames: list[str], decoder: str, repeats: int = 5) -> float:
    """Bare decoding speed, frames per second, in this process (best of `repeats` rounds)."""
    decode_jpeg(frames[0], decoder)
    best = 0.0
    # best of several rounds: a shared machine's other load only ever slows a round down
    for _ in range(repeats):
        started = time.perf_counter()
        for frame in frames:
            decode_jpeg(frame, decoder)
        best = max(best, len(frames) / (time.perf_counter() - started))
    return best


def time_extraction(video: Path, num_frames: int, repeats: int = 2) -> dict:
    """Seconds to extract `num_frames` frames of one video with and without seeking (best of repeats)."""
    timings, outputs = {}, {}
    for seek in (True, False):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            outputs[seek] = read_video_frames(video, num_frames, short_side=224, seek=seek)
            best = min(best, time.perf_counter() - started)
        timings["seek_s" if seek else "full_decode_s"] = best
    timings["identical"] = all(np.array_equal(a, b) for a, b in zip(outputs[True], outputs[False]))
    return timings


def time_loader(tsv: str, decoder: str, num_frames: int, size: int, batch_size: int, workers: int,
                batches: int, pin_memory: bool, train: bool) -> float:
    """Clips per second through Dataset + DataLoader (after two warm-up batches)."""
    dataset = VideoDataset(tsv, num_frames=num_frames, size=size, train=train, decoder=decoder)
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * (batches + 2))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory, drop_last=True,
                        prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    started = time.perf_counter()
    clips = 0
    for batch in iterator:
        if batch["video"].shape != (batch_size, num_frames, 3, size, size) or batch["video"].dtype != torch.uint8:
            raise RuntimeError(f"unexpected batch video {tuple(batch['video'].shape)} {batch['video'].dtype}")
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - started)


def bench_data(tsv: Optional[str] = None, num_frames: int = 5, size: int = 224, batch_size: int = 8,
               workers: int = 2, batches: int = 16, decoders: Optional[Sequence[str]] = None,
               train: bool = True, synthetic_rows: int = 64, video: Optional[str] = None,
               out: Optional[str] = "runs/bench/bench_data.json") -> dict:
    """Decode and loader speed of each decoder (`violet-ds bench data` documents the arguments), a line per
    decoder as it finishes; with `video`, also the extraction timing (`time_extraction`). The results, with the
    run's `meta`, are written to `out` (when given) and returned."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pin_memory = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        if tsv is None:
            tsv = str(write_synthetic_tsv(Path(scratch) / "bench.tsv", rows=synthetic_rows))
            source = "synthetic 320x240 JPEG q90"
        else:
            source = tsv
        first = TSVFile(resolve_tsv_paths(tsv)[0])
        sample_frames = [f for row in range(min(len(first), 8)) for f in first.frames(row)[1]]
        results = {"source": source, "num_frames": num_frames, "size": size, "batch_size": batch_size,
                   "workers": workers, "pin_memory": pin_memory, "train": train, "default_decoder": resolve_decoder("auto"),
                   "decoders": {}}
        for name in decoders or available_decoders():
            decode_fps = time_decoder(sample_frames, name)
            clips_per_s = time_loader(tsv, name, num_frames, size, batch_size, workers, batches, pin_memory, train)
            results["decoders"][name] = {"decode_frames_per_s": round(decode_fps, 1),
                                         "loader_clips_per_s": round(clips_per_s, 1)}
            print(f"{name:12s} decode {decode_fps:8.1f} frames/s (1 process)   loader {clips_per_s:7.1f} clips/s "
                  f"({num_frames}x{size}x{size}, {workers} workers, batch {batch_size})", flush=True)
    if video:
        results["extraction"] = time_extraction(Path(video), num_frames)
    results["meta"] = bench_meta()
    if out:
        write_results(out, results)
    return results
