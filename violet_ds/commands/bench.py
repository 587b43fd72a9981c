"""`violet-ds bench train|gpu|data|targets`: the benchmark commands. Each calls its benchmark in
`violet_ds.bench`, prints the table and names the JSON file of the results."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from violet_ds.bench import data as data_bench
from violet_ds.bench import gpu as gpu_check
from violet_ds.bench import targets as targets_bench
from violet_ds.bench import train as train_bench
from violet_ds.bench.meta import results_json


def bench_train(models: List[str] = ["violet-tiny"], batch_size: int = 2, frames: int = 4, image_size: int = 224,
                text_len: int = 32, checkpointing: List[bool] = [False, True], steps: int = 3, warmup: int = 1,
                precision: str = "bf16", ds_config: str = "auto", divergence_guard: List[bool] = [False],
                compile: List[bool] = [False], keep_host_memory: List[bool] = [True],
                tokenizer: Optional[str] = None, strategies: List[str] = ["rm", "bm"], threads: int = 2,
                output: str = "runs/bench/bench_train.json", count_ops: bool = False,
                overflow_check: List[Optional[bool]] = [None], count_flops: bool = True) -> None:
    """Benchmark one pretraining step (VTM + MLM + MVM-pixel, forward + backward + ZeRO-2 step) per model,
    with activation checkpointing off and on; prints a table and writes JSON.

    Args:
        models: registered model names.
        batch_size: micro-batch size.
        frames: frames per clip.
        image_size: frame side in pixels (multiple of 32).
        text_len: text tokens.
        checkpointing: activation-checkpointing settings to compare.
        steps: timed steps (the median is reported).
        warmup: untimed steps first.
        precision: bf16, fp16 or fp32.
        compile: `model.compile` settings to compare (regional torch.compile; warm-up steps absorb the compile).
        keep_host_memory: `engine.keep_host_memory` settings to compare (CPU: malloc keeps freed memory instead
            of returning it to the kernel; `page_faults_per_step` in the JSON shows the difference).
        divergence_guard: divergence-guard settings to compare (the trainer's per-step non-finite check;
            with it on, `guard_us_per_step` is the guard's own cost per step, timed in isolation).
        ds_config: DeepSpeed JSON (its "auto" fields are filled); auto = zero2_bf16.json on CUDA,
            cpu_test.json (small buckets) on CPU.
        tokenizer: BERT-style vocabulary folder (default: the packaged BERT-uncased vocabulary).
        strategies: visual masking strategies (add `am` to include the attention pass).
        threads: torch CPU threads.
        output: JSON file of the results.
        count_ops: also run one step under an aten-op counter: ops, host syncs (`.item()`, `.cpu()`,
            `.tolist()`, data-dependent shapes) and copies per step, and the most frequent ops.
        overflow_check: bf16 settings of DeepSpeed's per-gradient overflow scan to compare (`[true, false]`);
            null = what the ds_config resolves to (off with torch's fused AdamW, which skips non-finite steps
            on the device).
        count_flops: count model FLOPs (one more forward + backward; with compiled blocks it recompiles them).
    """
    rows = train_bench.bench_train(
        models=models, batch_size=batch_size, frames=frames, image_size=image_size, text_len=text_len,
        checkpointing=checkpointing, steps=steps, warmup=warmup, precision=precision, ds_config=ds_config,
        divergence_guard=divergence_guard, compile=compile, keep_host_memory=keep_host_memory, tokenizer=tokenizer,
        strategies=strategies, threads=threads, output=output, count_ops=count_ops, overflow_check=overflow_check,
        count_flops=count_flops)
    print(train_bench.format_table(rows), flush=True)
    print(f"results: {output}", flush=True)


def bench_gpu(mode: str = "auto", output: str = "runs/bench/gpu_check.json", peak_tflops: Optional[float] = None,
              tokenizer: Optional[str] = None, budget_s: float = 480.0,
              sections: List[str] = ["env", "attention", "steps", "max_batch", "loader", "kernels"],
              rows: Optional[List[str]] = None, overflow_check: List[Union[bool, str]] = ["on", "off"],
              compile: Optional[List[Union[bool, str]]] = None) -> int:
    """One-shot check of every CUDA path: engine steps (bf16/fp16, FusedAdam/torch/apex, checkpointing off/on/offload),
    attention kernels, max batch, data loader; prints one table and writes JSON.

    Args:
        mode: gpu, cpu (toy sizes, what CI runs) or auto (gpu when CUDA is available).
        output: JSON results file (rewritten after every section).
        peak_tflops: dense bf16 peak of the card for MFU (default: looked up from the device name).
        tokenizer: BERT vocabulary folder (default: the packaged one).
        budget_s: skip the sections still to come once this many seconds have passed.
        sections: which sections to run (env, attention, steps, max_batch, loader, kernels: the Video Swin
            forward + backward per window-attention kernel at batch 16 and 64, run last).
        rows: run only the engine-step and max-batch rows whose name contains one of these strings (e.g.
            `--rows '[fp16, ckpt]'` for a rerun of what a short device slot left out); default: every row.
        overflow_check: code paths of the bf16 violet-v2 rows (batch 16 and the largest batch) to run side by side:
            `on` = DeepSpeed's per-gradient overflow scan (the previous path, rows named "overflow-scan"), `off` =
            no scan, a non-finite step skipped on the device (the default path).
        compile: `off` / `on` = eager / regionally compiled violet-v2 blocks at batch 16 (compile time, graphs,
            recompiles); default both on a GPU, `[off]` in the CPU mode (inductor takes minutes there).
    Returns 0 when every section ran, 1 when one failed (the table says which).
    """
    check = gpu_check.bench_gpu(mode=mode, output=output, peak_tflops=peak_tflops, tokenizer=tokenizer,
                                budget_s=budget_s, sections=sections, rows=rows,
                                overflow_check=_on_off(overflow_check),
                                compile=None if compile is None else _on_off(compile))
    print(gpu_check.format_table(check.results), flush=True)
    print(f"results: {check.path}", flush=True)
    return 1 if check.failed else 0


def _on_off(values: List[Union[bool, str]]) -> List[str]:
    """A switch list as "on" / "off" (a YAML command line reads `[on, off]` as booleans)."""
    return [("on" if value else "off") if isinstance(value, bool) else value for value in values]


def bench_data(tsv: Optional[str] = None, num_frames: int = 5, size: int = 224, batch_size: int = 8,
               workers: int = 2, batches: int = 16, decoders: Optional[list[str]] = None,
               train: bool = True, synthetic_rows: int = 64, video: Optional[str] = None,
               out: Optional[str] = "runs/bench/bench_data.json") -> int:
    """Data-loader throughput in clips/s for each JPEG decoder (real Dataset + DataLoader).

    Args:
        tsv: frame TSV(s) to read (path, glob or comma list); default: a synthetic 320x240 TSV.
        num_frames: frames per clip.
        size: output frame size (square).
        batch_size: clips per batch.
        workers: DataLoader worker processes.
        batches: timed batches per decoder (after two warm-up batches).
        decoders: decoders to compare (default: every installed one of simplejpeg, pillow).
        train: training transforms (random temporal offset + random crop) instead of eval ones.
        synthetic_rows: rows (videos of 8 frames) of the synthetic TSV when no --tsv is given.
        video: also time frame extraction from this video file, seeking vs decoding straight through.
        out: JSON results file (time, host, versions and commit included, to compare runs over time).
    """
    results = data_bench.bench_data(tsv=tsv, num_frames=num_frames, size=size, batch_size=batch_size,
                                    workers=workers, batches=batches, decoders=decoders, train=train,
                                    synthetic_rows=synthetic_rows, video=video, out=out)
    print(f"source: {results['source']}; default decoder (auto): {results['default_decoder']}")
    if video:
        timing = results["extraction"]
        print(f"extraction of {num_frames} frames from {video}: seek {timing['seek_s']:.3f}s, "
              f"full decode {timing['full_decode_s']:.3f}s, identical frames: {timing['identical']}")
    if out:
        print(f"results: {out}")
    return 0


def bench_targets(
    targets: Optional[List[str]] = None,
    num_frames: int = 4,
    size: int = 224,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    threads: Optional[int] = None,
    weights: Optional[Dict[str, Dict[str, Any]]] = None,
    output: Optional[str] = "runs/bench/bench_targets.json",
) -> int:
    """Time per clip of each MVM target's teacher (real architectures, random weights unless --weights).

    Args:
        targets: which to time (default: every registered target; `optical_flow_small` = RAFT-small).
        num_frames: frames per clip.
        size: square frame side (multiple of 32).
        batch_size: clips per call (the time reported is per clip).
        warmup: untimed calls first.
        repeats: timed calls; the best is reported.
        device: cpu, cuda, cuda:1.
        dtype: teacher dtype (float32, bf16, fp16).
        threads: torch CPU threads (default: torch's choice).
        weights: per-target options of real local teacher files, used instead of random ones.
        output: JSON file for the results (also printed).
    """
    result = targets_bench.bench_targets(targets=targets, num_frames=num_frames, size=size, batch_size=batch_size,
                                         warmup=warmup, repeats=repeats, device=device, dtype=dtype, threads=threads,
                                         weights=weights, output=output)
    lines = [f"| target | kind | teacher params (M) | ms / clip ({num_frames}x{size}px) | clips/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['kind']} | {r['teacher_params_m']} | {r['ms_per_clip']} | {r['clips_per_s']} |"
              for r in result["results"]]
    print("\n".join(lines))
    print(results_json(result))
    return 0
