"""`violet-ds bench gpu` (and `tools/gpu_check.sh`): one command that exercises every CUDA path and prints
one table.

Sections, each isolated (a failing section is reported with its error and the rest still runs), results
written to JSON after every section so a run cut short still leaves what it measured:

- env: torch/CUDA/DeepSpeed versions, device, bf16 dense peak used for MFU, apex and FlexAttention availability;
- attention: which SDPA/Flex kernels a violet forward+backward actually ran (profiler op names), and the
  Video Swin window attention forward+backward time per kernel choice (sdpa vs flex);
- steps: training steps through the real DeepSpeed ZeRO-2 engine and the pretraining task (VTM + MLM +
  MVM-pixel) for each precision (bf16, fp16), optimizer (DeepSpeed FusedAdam, torch fused AdamW, apex when
  importable) and activation checkpointing off / on / on + CPU offload: step time, samples/s, TFLOP/s, MFU,
  peak memory;
- max_batch: the largest micro-batch that fits, with and without checkpointing (doubling, then bisection);
- profile: the top ops of one violet-v2 step by device time and its host syncs (where MFU goes);
- loader: the real Dataset + DataLoader at the training frame size with worker processes and pinned memory
  (clips/s), next to the training step's samples/s.

`--mode cpu` runs the same code paths at toy sizes on the CPU (fp32/bf16, torch AdamW, tiny model): CI runs it
so the command never rots. MFU is reported against the card's dense bf16 peak (`--peak_tflops` overrides).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by device-name fragment
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "RTX 4090": 165.2, "V100": 125.0}


def peak_tflops_for(name: str) -> Optional[float]:
    for fragment, value in BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return value
    return None


def _in_child(function: Callable[[dict], dict], spec: dict, timeout_s: float) -> dict:
    """Run `function(spec)` in a fresh spawned process (its own CUDA context and peak memory)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child_main, args=(function, spec, queue))
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             if k in os.environ}
    process.start()
    os.environ.update(saved)
    try:
        status, result = queue.get(timeout=timeout_s)
    except Exception:
        process.kill()
        raise TimeoutError(f"no result within {timeout_s:.0f} s") from None
    process.join(timeout=30)
    if status != "ok":
        raise RuntimeError(result)
    return result


def _child_main(function, spec, queue) -> None:
    try:
        queue.put(("ok", function(spec)))
    except BaseException as error:  # reported by the parent with the section that failed
        queue.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"))


# ----------------------------------------------------------------------------------------- sections
def _env(spec: dict) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": "cpu", "bf16_peak_tflops": None}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError as error:
        info["deepspeed"] = f"missing ({error})"
    try:
        import apex  # noqa: F401
        from apex.optimizers import FusedAdam  # noqa: F401

        info["apex"] = True
    except ImportError:
        info["apex"] = False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        info["flex_attention"] = True
    except ImportError:
        info["flex_attention"] = False
    if torch.cuda.is_available() and spec["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    bf16_peak_tflops=spec.get("peak_tflops") or peak_tflops_for(props.name))
    return info


ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention": "sdpa-flash",
    "aten::_scaled_dot_product_efficient_attention": "sdpa-mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "sdpa-cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa-cpu-flash",
    "aten::_scaled_dot_product_attention_math": "sdpa-math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "sdpa-fused-other",
}


def _attention(spec: dict) -> dict:
    """Which attention kernels a violet training forward+backward runs, per Video Swin attention choice; and
    the Video Swin backbone's forward+backward time with each choice."""
    from torch.profiler import ProfilerActivity, profile

    from violet_ds.models import create_model

    device = torch.device("cuda" if spec["cuda"] else "cpu")
    dtype = torch.bfloat16 if spec["cuda"] else torch.float32
    torch.manual_seed(0)
    model = create_model(spec["model"], max_frames=max(spec["frames"], 4)).to(device)
    video = torch.randn(spec["batch_size"], spec["frames"], 3, spec["image_size"], spec["image_size"], device=device)
    ids = torch.randint(1000, 2000, (spec["batch_size"], spec["text_len"]), device=device)
    mask = torch.ones_like(ids)
    choices = ["sdpa", "flex"] if spec["cuda"] and spec["flex"] else ["sdpa"]
    out: Dict[str, dict] = {}
    for choice in choices:
        model.video_backbone.set_attention(choice)

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=spec["cuda"]):
                result = model(video, ids, mask)
            result.hidden.float().square().mean().backward()

        step()  # warm-up (compiles FlexAttention on CUDA)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["cuda"] else [])
        with profile(activities=activities) as prof:
            step()
        kernels: Dict[str, int] = {}
        for event in prof.key_averages():
            kind = ATTENTION_OPS.get(event.key)
            if kind is None and "flex_attention" in event.key.lower():
                kind = "flex"
            if kind is not None:
                kernels[kind] = kernels.get(kind, 0) + event.count
        # the backbone alone, forward+backward, median of 5
        backbone = model.video_backbone
        clip = video.transpose(1, 2)
        times = []
        for _ in range(6):
            if spec["cuda"]:
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=spec["cuda"]):
                features = backbone(clip)
            features.float().square().mean().backward()
            if spec["cuda"]:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        times = sorted(times[1:])
        out[choice] = {"kernels": kernels, "video_swin_fwd_bwd_ms": round(1000 * times[len(times) // 2], 2)}
    return out


def _max_batch(spec: dict) -> dict:
    """Largest micro-batch whose training step fits (one engine, doubling then bisection; see bench.py)."""
    from violet_ds.commands.bench import _measure

    return _measure({**spec, "search": True, "batch_size": spec["start"], "steps": 1, "warmup": 0})


def _loader(spec: dict) -> dict:
    import tempfile

    from violet_ds.data.bench import time_loader, write_synthetic_tsv
    from violet_ds.data.frames import resolve_decoder

    with tempfile.TemporaryDirectory() as scratch:
        tsv = write_synthetic_tsv(Path(scratch) / "bench.tsv", rows=spec["rows"], frames=8,
                                  height=spec["source_h"], width=spec["source_w"])
        clips = time_loader(str(tsv), "auto", spec["frames"], spec["image_size"], spec["batch_size"],
                            spec["workers"], spec["batches"], spec["pin_memory"], train=True)
    return {"decoder": resolve_decoder("auto"), "workers": spec["workers"], "pin_memory": spec["pin_memory"],
            "clips_per_s": round(clips, 1), "source": f"synthetic {spec['source_w']}x{spec['source_h']} JPEG q90"}


# ----------------------------------------------------------------------------------------- driver
def _plan(mode: str, apex: bool, tokenizer: Optional[str]) -> dict:
    if mode == "gpu":
        base = {"frames": 4, "image_size": 224, "text_len": 32, "threads": 8, "strategies": ["rm", "bm"],
                "tokenizer": tokenizer, "warmup": 2, "steps": 5, "ds_config": "zero2_bf16.json"}
        fp16 = {"ds_config": "zero2_fp16.json", "precision": "fp16"}
        # the rows every check needs first; `extra_steps` run after the max-batch search and the loader, so a
        # short device slot still gets the max batch (MFU at scale) before the finer comparisons
        steps = [
            ("violet-tiny bf16", {"model": "violet-tiny", "batch_size": 32, "precision": "bf16", "checkpointing": False}),
            ("violet-v2 bf16 torch-fused-AdamW", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                                  "checkpointing": False, "optimizer": "adamw", "profile": True}),
            ("violet-v2 fp16", {"model": "violet-v2", "batch_size": 16, "checkpointing": False, **fp16}),
            ("violet-v2 bf16 ckpt", {"model": "violet-v2", "batch_size": 16, "precision": "bf16", "checkpointing": True}),
            ("violet-v2 bf16 ds-FusedAdam", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                             "checkpointing": False, "optimizer": "deepspeed_fused_adam"}),
        ]
        extra_steps = [
            # batch 16 is bound by the host launching kernels; at 64 the profile shows what the GPU itself spends
            ("violet-v2 bf16 batch 64", {"model": "violet-v2", "batch_size": 64, "precision": "bf16",
                                         "checkpointing": False, "profile": True, "steps": 3}),
            ("violet-v2 bf16 ckpt+offload", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                             "checkpointing": True, "offload": True}),
            ("violet-v2 bf16 flex-attn", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                          "checkpointing": False, "attention": "flex"}),
            # last: compiling the blocks took over 259 s on an H200 (torch 2.11); FLOPs are the eager row's (a
            # FlopCounterMode pass would recompile every graph)
            ("violet-v2 bf16 compiled blocks", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                                "checkpointing": False, "compile": True, "warmup": 3,
                                                "count_flops": False}),
        ]
        if apex:
            steps.append(("violet-v2 bf16 apex FusedAdam", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                                            "checkpointing": False, "optimizer": "apex_fused_adam"}))
        return {"base": base, "steps": steps, "extra_steps": extra_steps,
                "attention": {"model": "violet-v2", "batch_size": 8, "frames": 4, "image_size": 224, "text_len": 32,
                              "flex": True},
                "max_batch": [("violet-v2 bf16 no ckpt", {"model": "violet-v2", "precision": "bf16", "checkpointing": False,
                                                          "start": 64, "limit": 1024, "bisect": 2}),
                              ("violet-v2 bf16 ckpt", {"model": "violet-v2", "precision": "bf16", "checkpointing": True,
                                                       "start": 128, "limit": 2048, "bisect": 2})],
                "loader": {"frames": 4, "image_size": 224, "batch_size": 16, "workers": 8, "batches": 24,
                           "pin_memory": True, "rows": 96, "source_h": 240, "source_w": 320}}
    base = {"frames": 2, "image_size": 64, "text_len": 16, "threads": 2, "strategies": ["rm", "bm"],
            "tokenizer": tokenizer, "warmup": 1, "steps": 2, "ds_config": "cpu_test.json",
            "model": "violet-tiny", "batch_size": 2}
    steps = [("violet-tiny fp32", {"precision": "fp32", "checkpointing": False, "profile": True})]
    extra_steps = [("violet-tiny bf16 ckpt+offload", {"precision": "bf16", "checkpointing": True, "offload": True})]
    return {"base": base, "steps": steps, "extra_steps": extra_steps,
            "attention": {"model": "violet-tiny", "batch_size": 2, "frames": 2, "image_size": 64, "text_len": 16,
                          "flex": False},
            "max_batch": [],
            "loader": {"frames": 2, "image_size": 64, "batch_size": 4, "workers": 2, "batches": 3, "pin_memory": False,
                       "rows": 12, "source_h": 96, "source_w": 128}}


OPTIMIZER_CLASSES = {"deepspeed_fused_adam": "FusedAdam", "apex_fused_adam": "FusedAdam", "adamw": "AdamW"}


def _row_problem(row: dict, spec: dict, cuda: bool) -> Optional[str]:
    """What is wrong with a measured step row (the checks the CUDA engine tests make): a non-finite loss, the
    wrong device or precision, another optimizer than the one asked for. None when the row is sound."""
    if not math.isfinite(row.get("loss", float("nan"))):
        return f"loss is not finite: {row.get('loss')}"
    if cuda != str(row.get("device", "")).startswith("cuda"):
        return f"ran on {row.get('device')}"
    if spec.get("precision") and row.get("precision") != spec["precision"]:
        return f"precision {row.get('precision')}, asked for {spec['precision']}"
    expected = OPTIMIZER_CLASSES.get(spec.get("optimizer", "auto"))
    if expected and row.get("optimizer") != expected:
        return f"optimizer {row.get('optimizer')}, asked for {expected} ({spec['optimizer']})"
    return None


def _add_mfu(row: dict, steps: dict, peak: Optional[float]) -> None:
    """TFLOP/s and MFU of a row whose FLOPs were not counted (a max-batch search, compiled blocks), from the model
    FLOPs per sample of the eager violet-v2 step row (no checkpointing: recomputation is not model FLOPs)."""
    reference = next((r for r in steps.values() if "error" not in r and r.get("model") == "violet-v2"
                      and not r.get("checkpointing") and r.get("gflops_per_step")), None)
    if "error" in row or reference is None or not row.get("samples_per_s"):
        return
    tflops = row["samples_per_s"] * reference["gflops_per_step"] / reference["batch_size"] / 1000
    row["achieved_tflops"] = round(tflops, 2)
    row["mfu_percent"] = round(100 * tflops / peak, 1) if peak else None


def _format_table(results: dict) -> str:
    env = results.get("env", {})
    lines = [f"violet-ds GPU check: {env.get('device', '?')} | torch {env.get('torch')} (CUDA {env.get('cuda')}) | "
             f"deepspeed {env.get('deepspeed')} | apex {env.get('apex')} | flex {env.get('flex_attention')} | "
             f"bf16 peak {env.get('bf16_peak_tflops')} TFLOP/s", ""]
    header = (f"{'engine step':<34} {'batch':>5} {'optimizer':>16} {'step ms':>8} {'samples/s':>10} {'TFLOP/s':>8} "
              f"{'MFU %':>6} {'peak MB':>8} {'loss':>7}")
    lines += [header, "-" * len(header)]
    for name, row in results.get("steps", {}).items():
        if "error" in row:
            lines.append(f"{name:<34} FAILED: {row['error'].splitlines()[0][:120]}")
            continue
        mfu = f"{row['mfu_percent']:.1f}" if row.get("mfu_percent") is not None else "-"
        lines.append(f"{name:<34} {row['batch_size']:>5} {row['optimizer'][:16]:>16} {1000 * row['step_s_median']:>8.1f} "
                     f"{row['samples_per_s']:>10.2f} {row['achieved_tflops']:>8.2f} {mfu:>6} "
                     f"{row['peak_memory_mb']:>8.0f} {row['loss']:>7.3f}")
    for name, row in results.get("steps", {}).items():
        if row.get("profile"):
            lines += ["", f"profile of one '{name}' step: top ops by self time (ms, calls); host syncs "
                      f"{row['profile']['host_syncs']}"]
            lines += [f"  {op[:60]:<60} {ms:>9.2f} {calls:>6}" for op, ms, calls in row["profile"]["top_ops_ms"]]
    attention = results.get("attention", {})
    if attention:
        lines += ["", "attention (violet fwd+bwd, kernels the profiler saw; Video Swin fwd+bwd time)"]
        if "error" in attention:
            lines.append(f"  FAILED: {attention['error'].splitlines()[0][:160]}")
        for choice, row in attention.items():
            if choice != "error":
                lines.append(f"  video attention={choice:<5} kernels {row['kernels']}  video swin fwd+bwd "
                             f"{row['video_swin_fwd_bwd_ms']} ms")
    for name, row in results.get("max_batch", {}).items():
        if "error" in row:
            lines.append(f"max batch {name}: FAILED: {row['error'].splitlines()[0][:120]}")
        else:
            lines.append(f"max batch {name}: {row['max_batch']} ({row.get('bounded_by', '')}), "
                         f"{row.get('samples_per_s')} samples/s, {row.get('achieved_tflops', '-')} TFLOP/s, "
                         f"MFU {row.get('mfu_percent', '-')} %, peak {row.get('peak_memory_mb')} MB")
    loader = results.get("loader")
    if loader:
        if "error" in loader:
            lines.append(f"loader: FAILED: {loader['error'].splitlines()[0][:120]}")
        else:
            lines.append(f"loader: {loader['clips_per_s']} clips/s ({loader['decoder']}, {loader['workers']} workers, "
                         f"pin_memory={loader['pin_memory']}, {loader['source']})")
    lines.append(f"total {results.get('seconds', 0):.0f} s")
    return "\n".join(lines)


def bench_gpu(mode: str = "auto", output: str = "runs/bench/gpu_check.json", peak_tflops: Optional[float] = None,
              tokenizer: Optional[str] = None, budget_s: float = 480.0,
              sections: List[str] = ["env", "attention", "steps", "max_batch", "loader"],
              rows: Optional[List[str]] = None) -> int:
    """One-shot check of every CUDA path: engine steps (bf16/fp16, FusedAdam/torch/apex, checkpointing off/on/offload),
    attention kernels, max batch, data loader; prints one table and writes JSON.

    Args:
        mode: gpu, cpu (toy sizes, what CI runs) or auto (gpu when CUDA is available).
        output: JSON results file (rewritten after every section).
        peak_tflops: dense bf16 peak of the card for MFU (default: looked up from the device name).
        tokenizer: BERT vocabulary folder (default: the packaged one).
        budget_s: skip the sections still to come once this many seconds have passed.
        sections: which sections to run.
        rows: run only the engine-step and max-batch rows whose name contains one of these strings (e.g.
            `--rows '[fp16, ckpt]'` for a rerun of what a short device slot left out); default: every row.
    Returns 0 when every section ran, 1 when one failed (the table says which).
    """
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" else "cpu"
    cuda = mode == "gpu"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("bench gpu --mode gpu: CUDA is not available on this machine")
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = time.perf_counter()
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    from violet_ds.bench_meta import bench_meta

    results: dict = {"mode": mode, "meta": bench_meta()}
    failed = False

    def save() -> None:
        results["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=1))

    def left() -> float:
        return budget_s - (time.perf_counter() - started)

    results["env"] = _env({"cuda": cuda, "peak_tflops": peak_tflops})
    save()
    print(f"env: {results['env']}", flush=True)
    plan = _plan(mode, bool(results["env"].get("apex")), tokenizer)
    if rows:
        def wanted(name: str) -> bool:
            return any(part in name for part in rows)

        plan["steps"] = [(name, extra) for name, extra in plan["steps"] if wanted(name)]
        plan["extra_steps"] = [(name, extra) for name, extra in plan["extra_steps"] if wanted(name)]
        plan["max_batch"] = [(name, extra) for name, extra in plan["max_batch"] if wanted(name)]
    peak = results["env"].get("bf16_peak_tflops")
    def run_child(func, spec: dict) -> dict:
        """One measurement in a child process; a failure becomes the row's `error` and marks the run failed."""
        nonlocal failed
        try:
            return _in_child(func, spec, timeout_s=max(30.0, left()))
        except Exception as error:
            failed = True
            return {"error": str(error)[:4000]}

    if "attention" in sections:
        results["attention"] = run_child(_attention, {**plan["attention"], "cuda": cuda})
        print(f"attention: {results['attention']}", flush=True)
        save()
    from violet_ds.commands.bench import _measure

    def run_steps(rows_to_run) -> None:
        nonlocal failed
        results.setdefault("steps", {})
        for name, extra in rows_to_run:
            if left() < 20:
                results["steps"][name] = {"error": "skipped: time budget spent"}
                continue
            spec = {**plan["base"], **extra}
            row = results["steps"][name] = run_child(_measure, spec)
            if "error" not in row:
                problem = _row_problem(row, spec, cuda)
                if problem:
                    failed = True
                    row["error"] = problem
            if "error" in row:
                print(f"{name}: FAILED {row['error'][:2000]}", flush=True)
            else:
                if row.get("gflops_per_step"):
                    row["mfu_percent"] = (100 * row["achieved_tflops"] / peak) if (peak and cuda) else None
                else:  # FLOPs not counted for this row (compiled blocks): those of the matching eager row
                    _add_mfu(row, results["steps"], peak if cuda else None)
                print(f"{name}: {1000 * row['step_s_median']:.1f} ms/step, {row['samples_per_s']:.1f} samples/s, "
                      f"{row['achieved_tflops']:.2f} TFLOP/s, peak {row['peak_memory_mb']:.0f} MB", flush=True)
            save()

    if "steps" in sections:
        run_steps(plan["steps"])
    if "loader" in sections:
        results["loader"] = run_child(_loader, plan["loader"])
        print(f"loader: {results['loader']}", flush=True)
        save()
    if "max_batch" in sections and plan["max_batch"]:
        results["max_batch"] = {}
        for name, extra in plan["max_batch"]:
            if left() < 60:
                results["max_batch"][name] = {"error": "skipped: time budget spent"}
                continue
            results["max_batch"][name] = run_child(_max_batch, {**plan["base"], **extra})
            _add_mfu(results["max_batch"][name], results.get("steps", {}), peak if cuda else None)
            print(f"max batch {name}: {results['max_batch'][name]}", flush=True)
            save()
    if "steps" in sections:
        run_steps(plan["extra_steps"])
    save()
    print(_format_table(results), flush=True)
    print(f"results: {path}", flush=True)
    return 1 if failed else 0


def _build_fused_adam(spec: dict) -> dict:
    from deepspeed.ops.op_builder import FusedAdamBuilder

    from violet_ds.engine.optim import _deepspeed_friendly_arch_list

    _deepspeed_friendly_arch_list()
    FusedAdamBuilder().load()
    return {}
