"""Time per clip of each MVM target's teacher (`violet-ds bench targets`).

Every teacher is the real architecture the paper uses (DALL-E dVAE encoder, RAFT-large and -small,
DPT-Large, 2D Swin-B, CLIP ViT-B/16, Video Swin-B) with *random* weights, written to a temporary
folder in the teacher's real checkpoint format by the target itself (`Target.random_teacher`; the
rows a target contributes are its `bench_variants`) and loaded through the target factory, so the command
needs no downloads and exercises the same loading path as training. Speed does not depend on the
weight values. Pass `--weights '{"depth": {"model_dir": "dpt-large/"}}'` to time real files instead.

Clips are random normalised float `(batch, frames, 3, size, size)`; a clip's time is the best of
`repeats` timed calls (after `warmup` untimed ones) divided by the batch size: the best, because on a
shared machine other load only ever slows a call down.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from violet_ds.bench.meta import bench_meta, write_results
from violet_ds.registry import TARGETS
from violet_ds.targets.base import create_target, list_targets, resolve_dtype


def bench_rows() -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Every row `bench targets` can time: row name -> (registered target, `random_teacher` arguments),
    as each registered target declares them (`Target.bench_variants`)."""
    rows = {}
    for name in list_targets():
        for row, variant in TARGETS.get(name).bench_variants().items():
            rows[row] = (name, variant)
    return rows


def _time_target(target, video: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        target.compute(video)
    best = float("inf")
    for _ in range(repeats):
        if video.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        target.compute(video)
        if video.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def _time_row(name: str, registered: str, variant: Dict[str, Any], options: Optional[Dict[str, Any]],
              video: torch.Tensor, warmup: int, repeats: int) -> dict:
    """One teacher built (from `options`, else a random teacher of `variant` in a temporary folder) and timed."""
    with tempfile.TemporaryDirectory(prefix="violet_ds_bench_") as tmp:
        if options is None:
            options = TARGETS.get(registered).random_teacher(Path(tmp), **variant)
        target = create_target(registered, **options).to(video.device, video.dtype)
        seconds = _time_target(target, video, warmup, repeats)
        info = target.describe()
    batch_size = video.shape[0]
    return {"target": name, "kind": info["kind"], "channels": info["channels"],
            "teacher_params_m": round(info["teacher_params"] / 1e6, 2),
            # three significant digits: the pixel target takes ~0.05 ms, which one decimal rounds to 0
            "ms_per_clip": float(f"{seconds / batch_size * 1000:.3g}"),
            "clips_per_s": round(batch_size / seconds, 3)}


def bench_targets(targets: Optional[Sequence[str]] = None, num_frames: int = 4, size: int = 224, batch_size: int = 1,
                  warmup: int = 1, repeats: int = 2, device: str = "cpu", dtype: str = "float32",
                  threads: Optional[int] = None, weights: Optional[Dict[str, Dict[str, Any]]] = None,
                  output: Optional[str] = "runs/bench/bench_targets.json") -> dict:
    """Time each teacher of `targets` (`violet-ds bench targets` documents the arguments), a line per target as
    it finishes. The results, with the run's `meta`, are written to `output` (when given) and returned."""
    if threads:
        torch.set_num_threads(threads)
    known = bench_rows()
    names = list(targets or known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"bench targets: unknown targets {unknown}; known: {list(known)}")
    weights = dict(weights or {})
    torch.manual_seed(0)
    torch_dtype = resolve_dtype(dtype) or torch.float32
    video = torch.randn(batch_size, num_frames, 3, size, size, device=device).to(torch_dtype)
    rows = []
    for name in names:
        registered, variant = known[name]
        row = _time_row(name, registered, variant, dict(weights[name]) if name in weights else None, video,
                        warmup, repeats)
        rows.append(row)
        print(f"{name:20s} {row['kind']:8s} {row['teacher_params_m']:8.2f}M {row['ms_per_clip']:10.3g} ms/clip",
              flush=True)
    # the machine's load average: on a shared host it says how much the numbers are inflated
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = {"device": str(device), "load_average": load, "dtype": str(torch_dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(), "num_frames": num_frames, "size": size, "batch_size": batch_size,
              "repeats": repeats, "weights": "given" if weights else "random", "results": rows, "meta": bench_meta()}
    if output:
        write_results(output, result)
    return result
