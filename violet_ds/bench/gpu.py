"""The GPU check behind `violet-ds bench gpu` (and `tools/gpu_check.sh`): every CUDA path exercised, one table.

Sections, each isolated (a failing section is reported with its error and the rest still runs), results
written to JSON after every section so a run cut short still leaves what it measured:

- env: torch/CUDA/DeepSpeed versions, device, bf16 dense peak used for MFU, apex and FlexAttention availability;
- attention: which SDPA/Flex kernels a violet forward+backward actually ran (profiler op names), and the
  Video Swin window attention forward+backward time per kernel choice (sdpa vs flex);
- steps: training steps through the real DeepSpeed ZeRO-2 engine and the pretraining task (VTM + MLM +
  MVM-pixel) for each precision (bf16, fp16), optimizer (DeepSpeed FusedAdam, torch fused AdamW, apex when
  importable) and activation checkpointing off / on / on + CPU offload: step time, samples/s, TFLOP/s, MFU,
  peak memory, aten ops and host syncs per step; the code paths to compare side by side on the same card
  (`overflow_check`: DeepSpeed's bf16 per-gradient overflow scan on, the previous path, or off, the on-device
  skip; `compile`: eager or regionally compiled blocks, with the compile time, graphs and recompiles);
- max_batch: the largest micro-batch that fits, with and without checkpointing (doubling, then bisection), then
  the step at the largest batch without checkpointing timed with each `overflow_check` setting (MFU at scale);
- profile: the top ops of one violet-v2 step by device time and its host syncs (where MFU goes);
- kernels (last): the Video Swin backbone's forward + backward per window-attention kernel (SDPA as torch picks,
  SDPA forced to its memory-efficient, cuDNN or math backend, the explicit baddbmm + softmax, compiled
  FlexAttention) at batch 16 and 64, and the fastest per batch;
- loader: the real Dataset + DataLoader at the training frame size with worker processes and pinned memory
  (clips/s), next to the training step's samples/s.

`--mode cpu` runs the same code paths at toy sizes on the CPU (fp32/bf16, torch AdamW, tiny model): CI runs it
so the command never rots. MFU is reported against the card's dense bf16 peak (`--peak_tflops` overrides).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from violet_ds.bench.data import time_loader, write_synthetic_tsv
from violet_ds.bench.meta import bench_meta, write_results
from violet_ds.bench.train import measure_step, run_in_child
from violet_ds.data.frames import resolve_decoder

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by device-name fragment
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "RTX 4090": 165.2, "V100": 125.0}


def peak_tflops_for(name: str) -> Optional[float]:
    for fragment, value in BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return value
    return None


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


def _attention_kernels(step: Callable[[], None], cuda: bool) -> Dict[str, int]:
    """Calls of each attention kernel (ATTENTION_OPS, or FlexAttention) during one `step()` under the profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    kernels: Dict[str, int] = {}
    for event in prof.key_averages():
        kind = ATTENTION_OPS.get(event.key)
        if kind is None and "flex_attention" in event.key.lower():
            kind = "flex"
        if kind is not None:
            kernels[kind] = kernels.get(kind, 0) + event.count
    return kernels


def _backbone_ms(backbone, clip: torch.Tensor, dtype: torch.dtype, cuda: bool) -> float:
    """The Video Swin backbone alone, forward+backward: median milliseconds of 5 after one warm-up."""
    times = []
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(clip.device.type, dtype=dtype, enabled=cuda):
            features = backbone(clip)
        features.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times = sorted(times[1:])
    return round(1000 * times[len(times) // 2], 2)


def _attention(spec: dict) -> dict:
    """Which attention kernels a violet training forward+backward runs, per Video Swin attention choice; and
    the Video Swin backbone's forward+backward time with each choice."""
    # imported in the measuring process: building the models registry takes seconds
    from violet_ds.models import create_model

    cuda = spec["cuda"]
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = create_model(spec["model"], max_frames=max(spec["frames"], 4)).to(device)
    video = torch.randn(spec["batch_size"], spec["frames"], 3, spec["image_size"], spec["image_size"], device=device)
    ids = torch.randint(1000, 2000, (spec["batch_size"], spec["text_len"]), device=device)
    mask = torch.ones_like(ids)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            result = model(video, ids, mask)
        result.hidden.float().square().mean().backward()

    out: Dict[str, dict] = {}
    for choice in (["sdpa", "flex"] if cuda and spec["flex"] else ["sdpa"]):
        model.video_backbone.set_attention(choice)
        step()  # warm-up (compiles FlexAttention on CUDA)
        out[choice] = {"kernels": _attention_kernels(step, cuda),
                       "video_swin_fwd_bwd_ms": _backbone_ms(model.video_backbone, video.transpose(1, 2), dtype, cuda)}
    return out


WINDOW_KERNELS = {
    # name: (model.video_attention choice, SDPA backend forced or None = torch's own pick)
    "sdpa": ("sdpa", None), "sdpa-efficient": ("sdpa", "EFFICIENT_ATTENTION"), "sdpa-cudnn": ("sdpa", "CUDNN_ATTENTION"),
    "sdpa-math": ("sdpa", "MATH"), "explicit": ("explicit", None), "flex": ("flex", None)}
"""The Video Swin window-attention kernels the `kernels` section times (a forced SDPA backend that does not take
the relative-position bias, or its gradient, fails its row with torch's reason)"""


def _window_kernels(spec: dict) -> dict:
    """The Video Swin backbone alone, forward + backward, per window-attention kernel and batch size: median ms,
    or the error that kernel gave (unsupported input, out of memory). The fastest kernel per batch is named."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from violet_ds.models import create_model

    cuda = spec["cuda"]
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    backbone = create_model(spec["model"], max_frames=max(spec["frames"], 4)).video_backbone.to(device)
    timings: Dict[str, dict] = {}
    for batch in spec["batch_sizes"]:
        clip = torch.randn(batch, 3, spec["frames"], spec["image_size"], spec["image_size"], device=device)
        for name in spec["kernels"]:
            choice, backend = WINDOW_KERNELS[name]
            backbone.set_attention(choice)
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
                    ms = _backbone_ms(backbone, clip, dtype, cuda)
                timings.setdefault(name, {})[str(batch)] = ms
            except Exception as error:  # a kernel that refuses this input (or runs out of memory) fails its cell only
                first = (str(error).splitlines() or [""])[0]
                timings.setdefault(name, {})[str(batch)] = f"error: {type(error).__name__}: {first[:160]}"
            backbone.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        del clip
    fastest = {}
    for batch in map(str, spec["batch_sizes"]):
        measured = {name: row[batch] for name, row in timings.items() if isinstance(row.get(batch), float)}
        if measured:
            fastest[batch] = min(measured, key=measured.get)
    return {"batch_sizes": list(spec["batch_sizes"]), "ms": timings, "fastest": fastest,
            "frames": spec["frames"], "image_size": spec["image_size"], "model": spec["model"]}


def _max_batch(spec: dict) -> dict:
    """Largest micro-batch whose training step fits (one engine, doubling then bisection; see train.py)."""
    spec = {key: value for key, value in spec.items() if key != "timed_rows"}
    return measure_step({**spec, "search": True, "batch_size": spec["start"], "steps": 1, "warmup": 0})


def _loader(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        tsv = write_synthetic_tsv(Path(scratch) / "bench.tsv", rows=spec["rows"], frames=8,
                                  height=spec["source_h"], width=spec["source_w"])
        clips = time_loader(str(tsv), "auto", spec["frames"], spec["image_size"], spec["batch_size"],
                            spec["workers"], spec["batches"], spec["pin_memory"], train=True)
    return {"decoder": resolve_decoder("auto"), "workers": spec["workers"], "pin_memory": spec["pin_memory"],
            "clips_per_s": round(clips, 1), "source": f"synthetic {spec['source_w']}x{spec['source_h']} JPEG q90"}


# ----------------------------------------------------------------------------------------- driver
SWITCHES = ("on", "off")


def _scan_rows(name: str, settings: dict, overflow_check: Sequence[str]) -> List[tuple]:
    """The row `name` once per `overflow_check` setting: "off" (the default path: no per-gradient scan, non-finite
    steps skipped on the device) keeps the name, "on" (DeepSpeed's scan, the previous path) adds "overflow-scan"."""
    return [(name + (" overflow-scan" if scan == "on" else ""), {**settings, "overflow_check": scan == "on"})
            for scan in sorted(set(overflow_check), key=("off", "on").index)]


def _plan(mode: str, apex: bool, tokenizer: Optional[str], overflow_check: Sequence[str] = SWITCHES,
          compile: Sequence[str] = SWITCHES) -> dict:
    """What the check measures: shared step settings (`base`), engine-step rows, attention, max-batch and
    loader settings; full sizes on a GPU, toy sizes on the CPU. `overflow_check` / `compile`: the settings of each
    switch to run side by side ("on", "off")."""
    for name, values in (("overflow_check", overflow_check), ("compile", compile)):
        if not values or set(values) - set(SWITCHES):
            raise ValueError(f"bench gpu --{name}: a list of on / off, got {list(values)}")
    if mode == "gpu":
        return _gpu_plan(apex, tokenizer, overflow_check, compile)
    return _cpu_plan(tokenizer, overflow_check, compile)


def _gpu_plan(apex: bool, tokenizer: Optional[str], overflow_check: Sequence[str] = SWITCHES,
              compile: Sequence[str] = SWITCHES) -> dict:
    base = {"frames": 4, "image_size": 224, "text_len": 32, "threads": 8, "strategies": ["rm", "bm"],
            "tokenizer": tokenizer, "warmup": 2, "steps": 5, "ds_config": "zero2_bf16.json"}
    fp16 = {"ds_config": "zero2_fp16.json", "precision": "fp16"}
    # the rows every check needs first; `extra_steps` run after the max-batch search and the loader, so a
    # short device slot still gets the max batch (MFU at scale) before the finer comparisons
    v2 = {"model": "violet-v2", "batch_size": 16, "precision": "bf16", "checkpointing": False}
    # batch 16 is bound by the host launching kernels: ops per step counted, and the previous path next to it
    steps = [
        ("violet-tiny bf16", {"model": "violet-tiny", "batch_size": 32, "precision": "bf16", "checkpointing": False}),
        *_scan_rows("violet-v2 bf16 torch-fused-AdamW", {**v2, "optimizer": "adamw", "profile": True,
                                                        "count_ops": True}, overflow_check),
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
    ]
    if "on" in compile:
        # last: compiling the blocks took over 259 s on an H200 (torch 2.11) before each block shape shared one
        # graph; FLOPs are the eager row's (a FlopCounterMode pass would recompile every graph)
        extra_steps.append(("violet-v2 bf16 compiled blocks", {**v2, "compile": True, "warmup": 3,
                                                               "count_flops": False}))
    if apex:
        steps.append(("violet-v2 bf16 apex FusedAdam", {"model": "violet-v2", "batch_size": 16, "precision": "bf16",
                                                        "checkpointing": False, "optimizer": "apex_fused_adam"}))
    return {"base": base, "steps": steps, "extra_steps": extra_steps,
            "attention": {"model": "violet-v2", "batch_size": 8, "frames": 4, "image_size": 224, "text_len": 32,
                          "flex": True},
            "kernels": {"model": "violet-v2", "frames": 4, "image_size": 224, "batch_sizes": [16, 64],
                        "kernels": list(WINDOW_KERNELS)},
            "max_batch": [("violet-v2 bf16 no ckpt", {"model": "violet-v2", "precision": "bf16", "checkpointing": False,
                                                      "start": 64, "limit": 1024, "bisect": 2,
                                                      "timed_rows": _scan_rows("violet-v2 bf16 largest batch",
                                                                               {**v2, "steps": 3, "warmup": 1,
                                                                                "count_flops": False},
                                                                               overflow_check)}),
                          ("violet-v2 bf16 ckpt", {"model": "violet-v2", "precision": "bf16", "checkpointing": True,
                                                   "start": 128, "limit": 2048, "bisect": 2})],
            "loader": {"frames": 4, "image_size": 224, "batch_size": 16, "workers": 8, "batches": 24,
                       "pin_memory": True, "rows": 96, "source_h": 240, "source_w": 320}}


def _cpu_plan(tokenizer: Optional[str], overflow_check: Sequence[str] = SWITCHES,
              compile: Sequence[str] = ("off",)) -> dict:
    base = {"frames": 2, "image_size": 64, "text_len": 16, "threads": 2, "strategies": ["rm", "bm"],
            "tokenizer": tokenizer, "warmup": 1, "steps": 2, "ds_config": "cpu_test.json",
            "model": "violet-tiny", "batch_size": 2}
    steps = [("violet-tiny fp32", {"precision": "fp32", "checkpointing": False, "profile": True}),
             *_scan_rows("violet-tiny bf16", {"precision": "bf16", "checkpointing": False, "count_ops": True},
                         overflow_check)]
    extra_steps = [("violet-tiny bf16 ckpt+offload", {"precision": "bf16", "checkpointing": True, "offload": True})]
    if "on" in compile:  # inductor on 2 CPU cores: about a minute for violet-tiny
        extra_steps.append(("violet-tiny bf16 compiled blocks", {"precision": "bf16", "checkpointing": False,
                                                                 "compile": True, "count_flops": False}))
    return {"base": base, "steps": steps, "extra_steps": extra_steps,
            "attention": {"model": "violet-tiny", "batch_size": 2, "frames": 2, "image_size": 64, "text_len": 16,
                          "flex": False},
            # FlexAttention has no CPU backward; the bias gradient rules out SDPA's flash kernel, not the math one
            "kernels": {"model": "violet-tiny", "frames": 2, "image_size": 64, "batch_sizes": [2, 4],
                        "kernels": ["sdpa", "sdpa-math", "explicit"]},
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


def _step_lines(steps: dict) -> List[str]:
    header = (f"{'engine step':<44} {'batch':>5} {'optimizer':>16} {'step ms':>8} {'samples/s':>10} {'TFLOP/s':>8} "
              f"{'MFU %':>6} {'peak MB':>8} {'loss':>7} {'ops/step':>9} {'syncs':>6} {'compile s':>9} {'graphs':>6} "
              f"{'recomp':>6}")
    lines = [header, "-" * len(header)]
    for name, row in steps.items():
        if "error" in row:
            lines.append(f"{name:<44} FAILED: {row['error'].splitlines()[0][:120]}")
            continue
        mfu = f"{row['mfu_percent']:.1f}" if row.get("mfu_percent") is not None else "-"
        compile_s = f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-"
        lines.append(f"{name:<44} {row['batch_size']:>5} {row['optimizer'][:16]:>16} {1000 * row['step_s_median']:>8.1f} "
                     f"{row['samples_per_s']:>10.2f} {row['achieved_tflops']:>8.2f} {mfu:>6} "
                     f"{row['peak_memory_mb']:>8.0f} {row['loss']:>7.3f} {row.get('ops_per_step', '-'):>9} "
                     f"{row.get('host_syncs_per_step', '-'):>6} {compile_s:>9} {row.get('compile_graphs', '-'):>6} "
                     f"{row.get('recompiles', '-'):>6}")
    for name, row in steps.items():
        if row.get("compile_cache"):
            cache = row["compile_cache"]
            lines += ["", f"compile of '{name}': {row['compile_s']:.1f} s, inductor cache {cache['hits']} hits / "
                      f"{cache['misses']} misses ({'warm' if cache['hits'] and not cache['misses'] else 'cold'})"]
    for name, row in steps.items():
        if row.get("top_ops"):
            lines += ["", f"aten ops of one '{name}' step: {row['ops_per_step']} (host syncs {row['host_syncs']}, "
                      f"copies {row['copies']})",
                      "  " + ", ".join(f"{op} {count}" for op, count in row["top_ops"][:12])]
    for name, row in steps.items():
        if row.get("profile"):
            lines += ["", f"profile of one '{name}' step: top ops by self time (ms, calls); host syncs "
                      f"{row['profile']['host_syncs']}"]
            lines += [f"  {op[:60]:<60} {ms:>9.2f} {calls:>6}" for op, ms, calls in row["profile"]["top_ops_ms"]]
    return lines


def _attention_lines(attention: dict) -> List[str]:
    if not attention:
        return []
    lines = ["", "attention (violet fwd+bwd, kernels the profiler saw; Video Swin fwd+bwd time)"]
    if "error" in attention:
        lines.append(f"  FAILED: {attention['error'].splitlines()[0][:160]}")
    for choice, row in attention.items():
        if choice != "error":
            lines.append(f"  video attention={choice:<5} kernels {row['kernels']}  video swin fwd+bwd "
                         f"{row['video_swin_fwd_bwd_ms']} ms")
    return lines


def _kernel_lines(kernels: dict) -> List[str]:
    if not kernels:
        return []
    lines = ["", f"window attention kernels: {kernels.get('model', '')} Video Swin forward + backward, ms "
                 f"({kernels.get('frames')} x {kernels.get('image_size')} px)"]
    if "error" in kernels:
        return lines + [f"  FAILED: {kernels['error'].splitlines()[0][:160]}"]
    batches = [str(b) for b in kernels["batch_sizes"]]
    lines.append(f"  {'kernel':<16}" + "".join(f"{'batch ' + b:>12}" for b in batches))
    for name, row in kernels["ms"].items():
        cells = [row.get(b) for b in batches]
        lines.append(f"  {name:<16}" + "".join(f"{c:>12.2f}" if isinstance(c, float) else f"{'failed':>12}"
                                             for c in cells))
    for name, row in kernels["ms"].items():
        for b in batches:
            if isinstance(row.get(b), str):
                lines.append(f"  {name} at batch {b}: {row[b]}")
    lines.append("  fastest: " + ", ".join(f"batch {b} {kernels['fastest'][b]}" for b in batches
                                          if b in kernels["fastest"]))
    return lines


def _max_batch_lines(max_batch: dict) -> List[str]:
    lines = []
    for name, row in max_batch.items():
        if "error" in row:
            lines.append(f"max batch {name}: FAILED: {row['error'].splitlines()[0][:120]}")
        else:
            lines.append(f"max batch {name}: {row['max_batch']} ({row.get('bounded_by', '')}), "
                         f"{row.get('samples_per_s')} samples/s, {row.get('achieved_tflops', '-')} TFLOP/s, "
                         f"MFU {row.get('mfu_percent', '-')} %, peak {row.get('peak_memory_mb')} MB")
    return lines


def _loader_lines(loader: Optional[dict]) -> List[str]:
    if not loader:
        return []
    if "error" in loader:
        return [f"loader: FAILED: {loader['error'].splitlines()[0][:120]}"]
    return [f"loader: {loader['clips_per_s']} clips/s ({loader['decoder']}, {loader['workers']} workers, "
            f"pin_memory={loader['pin_memory']}, {loader['source']})"]


def format_table(results: dict) -> str:
    """The table `bench gpu` prints at the end: environment, engine steps (+ profiles), attention, max batch,
    loader, window-attention kernels and the total time."""
    env = results.get("env", {})
    lines = [f"violet-ds GPU check: {env.get('device', '?')} | torch {env.get('torch')} (CUDA {env.get('cuda')}) | "
             f"deepspeed {env.get('deepspeed')} | apex {env.get('apex')} | flex {env.get('flex_attention')} | "
             f"bf16 peak {env.get('bf16_peak_tflops')} TFLOP/s", ""]
    lines += _step_lines(results.get("steps", {}))
    lines += _attention_lines(results.get("attention", {}))
    lines += _max_batch_lines(results.get("max_batch", {}))
    lines += _loader_lines(results.get("loader"))
    lines += _kernel_lines(results.get("kernels", {}))
    lines.append(f"total {results.get('seconds', 0):.0f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the check
@dataclass
class GpuCheck:
    """One `bench gpu` run: what it measures, the results so far (rewritten to `path` after every section) and
    whether a section failed."""

    mode: str
    path: Path
    budget_s: float
    plan: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    failed: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.mode == "gpu"

    @property
    def peak(self) -> Optional[float]:
        """The card's dense bf16 peak for MFU (None on the CPU)."""
        return self.results["env"].get("bf16_peak_tflops") if self.cuda else None

    def left(self) -> float:
        """Seconds of the budget still to spend."""
        return self.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.results["seconds"] = time.perf_counter() - self.started
        write_results(self.path, self.results)

    def run_child(self, function: Callable[[dict], dict], spec: dict) -> dict:
        """One measurement in a child process; a failure becomes the row's `error` and marks the check failed."""
        try:
            return run_in_child(function, spec, timeout_s=max(30.0, self.left()))
        except Exception as error:
            self.failed = True
            return {"error": str(error)[:4000]}


def resolve_mode(mode: str) -> str:
    """gpu or cpu (`auto`: gpu when CUDA is available and DeepSpeed is not pinned to the CPU accelerator)."""
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" else "cpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("bench gpu --mode gpu: CUDA is not available on this machine")
    if mode != "gpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return mode


def select_rows(plan: dict, rows: Optional[Sequence[str]]) -> dict:
    """The plan with only the engine-step and max-batch rows whose name contains one of `rows` (None: every row)."""
    if not rows:
        return plan
    def wanted(name: str, extra: dict) -> bool:
        names = [name] + [row for row, _ in extra.get("timed_rows", ())]
        return any(part in candidate for part in rows for candidate in names)

    kept = {key: [(name, extra) for name, extra in plan[key] if wanted(name, extra)]
            for key in ("steps", "extra_steps", "max_batch")}
    return {**plan, **kept}


def start_check(mode: str, output: str, peak_tflops: Optional[float], tokenizer: Optional[str], budget_s: float,
                rows: Optional[Sequence[str]], overflow_check: Sequence[str] = SWITCHES,
                compile: Optional[Sequence[str]] = None) -> GpuCheck:
    """The environment section (saved and printed at once) and the plan of what follows."""
    mode = resolve_mode(mode)
    check = GpuCheck(mode=mode, path=Path(output), budget_s=budget_s)
    check.results.update(mode=mode, meta=bench_meta())
    check.results["env"] = _env({"cuda": check.cuda, "peak_tflops": peak_tflops})
    check.save()
    print(f"env: {check.results['env']}", flush=True)
    if compile is None:  # inductor on the CPU takes minutes: CI's CPU mode leaves the compiled row out unless asked
        compile = SWITCHES if check.cuda else ("off",)
    check.plan = select_rows(_plan(mode, bool(check.results["env"].get("apex")), tokenizer, overflow_check, compile),
                             rows)
    return check


def run_attention(check: GpuCheck) -> None:
    check.results["attention"] = check.run_child(_attention, {**check.plan["attention"], "cuda": check.cuda})
    print(f"attention: {check.results['attention']}", flush=True)
    check.save()


def _step_row(check: GpuCheck, spec: dict) -> dict:
    """One engine-step row, checked like the CUDA engine tests (`_row_problem`), with its MFU."""
    row = check.run_child(measure_step, spec)
    if "error" not in row:
        problem = _row_problem(row, spec, check.cuda)
        if problem:
            check.failed = True
            row["error"] = problem
    if "error" in row:
        return row
    if row.get("gflops_per_step"):
        row["mfu_percent"] = (100 * row["achieved_tflops"] / check.peak) if check.peak else None
    else:  # FLOPs not counted for this row (compiled blocks): those of the matching eager row
        _add_mfu(row, check.results["steps"], check.peak)
    return row


def run_steps(check: GpuCheck, rows: Sequence[tuple]) -> None:
    """Engine-step rows (name, settings over the plan's `base`), each printed and saved as it finishes."""
    steps = check.results.setdefault("steps", {})
    for name, extra in rows:
        if check.left() < 20:
            steps[name] = {"error": "skipped: time budget spent"}
            continue
        row = steps[name] = _step_row(check, {**check.plan["base"], **extra})
        if "error" in row:
            print(f"{name}: FAILED {row['error'][:2000]}", flush=True)
        else:
            print(f"{name}: {1000 * row['step_s_median']:.1f} ms/step, {row['samples_per_s']:.1f} samples/s, "
                  f"{row['achieved_tflops']:.2f} TFLOP/s, peak {row['peak_memory_mb']:.0f} MB", flush=True)
        check.save()


def run_loader(check: GpuCheck) -> None:
    check.results["loader"] = check.run_child(_loader, check.plan["loader"])
    print(f"loader: {check.results['loader']}", flush=True)
    check.save()


def run_kernels(check: GpuCheck) -> None:
    """The window-attention kernel table, skipped once less than a minute of the budget is left."""
    if check.left() < 60:
        check.results["kernels"] = {"error": "skipped: time budget spent"}
    else:
        check.results["kernels"] = check.run_child(_window_kernels, {**check.plan["kernels"], "cuda": check.cuda})
    print(f"kernels: {check.results['kernels']}", flush=True)
    check.save()


def run_max_batch(check: GpuCheck) -> None:
    """The max-batch searches, each skipped once less than a minute of the budget is left."""
    found = check.results["max_batch"] = {}
    for name, extra in check.plan["max_batch"]:
        if check.left() < 60:
            found[name] = {"error": "skipped: time budget spent"}
            continue
        found[name] = check.run_child(_max_batch, {**check.plan["base"], **extra})
        _add_mfu(found[name], check.results.get("steps", {}), check.peak)
        print(f"max batch {name}: {found[name]}", flush=True)
        check.save()
        largest = found[name].get("max_batch")
        if largest and extra.get("timed_rows"):
            # the step at the largest batch once per code path, each in a fresh process: MFU at scale side by side
            run_steps(check, [(f"{row} {largest}", {**settings, "batch_size": largest})
                              for row, settings in extra["timed_rows"]])


SECTIONS = ("env", "attention", "steps", "max_batch", "loader", "kernels")


def bench_gpu(mode: str = "auto", output: str = "runs/bench/gpu_check.json", peak_tflops: Optional[float] = None,
              tokenizer: Optional[str] = None, budget_s: float = 480.0, sections: Sequence[str] = SECTIONS,
              rows: Optional[Sequence[str]] = None, overflow_check: Sequence[str] = SWITCHES,
              compile: Optional[Sequence[str]] = None) -> GpuCheck:
    """Run the check's sections (`violet-ds bench gpu` documents the arguments): the environment, attention, the
    engine steps every check needs, the loader, the max-batch search, then the finer step comparisons, each
    isolated (a failing one is recorded with its error and the rest still runs). Returns the finished check."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"bench gpu --sections: unknown {unknown}; the sections are {list(SECTIONS)}")
    check = start_check(mode, output, peak_tflops, tokenizer, budget_s, rows, overflow_check, compile)
    if "attention" in sections:
        run_attention(check)
    if "steps" in sections:
        run_steps(check, check.plan["steps"])
    if "loader" in sections:
        run_loader(check)
    if "max_batch" in sections and check.plan["max_batch"]:
        run_max_batch(check)
    if "steps" in sections:
        run_steps(check, check.plan["extra_steps"])
    if "kernels" in sections:
        run_kernels(check)
    check.save()
    return check
