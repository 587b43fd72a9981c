"""Time of one training step (forward + backward + optimizer step) through the real
DeepSpeed ZeRO-2 engine and the pretraining task, with activation checkpointing off and on.

Each configuration runs in a fresh process, so its peak memory is its own (CUDA allocator peak on GPU,
peak RSS on CPU). Model FLOPs per step are counted by torch's FlopCounterMode over one forward+backward
(matmuls/convolutions/attention, the attended-masking pass included; recomputation under
checkpointing is counted too, so compare "model FLOPs" with checkpointing off). `violet-ds bench train` runs
:func:`bench_train`; `violet_ds.bench.gpu` measures its engine-step rows with :func:`measure_step`.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import time
import traceback
from collections import Counter
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from violet_ds.bench.meta import bench_meta, write_results
from violet_ds.engine import host_memory
from violet_ds.engine.divergence import DivergenceGuard
from violet_ds.engine.ds_config import precision_of
from violet_ds.engine.evaluator import to_device
from violet_ds.engine.logging import memory_mb


FLOP_PROBE_BATCH = 16
"""FLOPs of a step are counted on at most this many samples and scaled to the batch."""


def _flop_probe_size(batch_size: int, task) -> int:
    """Samples the FLOPs are counted on: FLOP_PROBE_BATCH, but no fewer than the task's VTM group (each sample
    with its `vtm_negatives` in-batch negatives), below which the FLOPs per sample shrink."""
    negatives = getattr(getattr(task, "cfg", None), "vtm_negatives", 0) or 0
    return min(batch_size, max(FLOP_PROBE_BATCH, negatives + 1))


def _synthetic_batch(batch_size: int, frames: int, image_size: int, text_len: int, tokenizer, seed: int = 0) -> dict:
    """Random clips and texts of the real layout (uint8 video, `[CLS] ... [SEP] [PAD]*`)."""
    generator = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch_size, frames, 3, image_size, image_size), dtype=torch.uint8,
                          generator=generator)
    special = torch.tensor(tokenizer.special_ids)
    ids = torch.randint(0, tokenizer.vocab_size, (batch_size, text_len), generator=generator)
    # replace special ids drawn by chance with [UNK]-free ordinary tokens
    ids = torch.where(torch.isin(ids, special), torch.full_like(ids, tokenizer.vocab_size - 1), ids)
    lengths = torch.randint(text_len // 2, text_len + 1, (batch_size,), generator=generator)
    positions = torch.arange(text_len)[None]
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = tokenizer.cls_id
    ids[torch.arange(batch_size), lengths - 1] = tokenizer.sep_id
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, tokenizer.pad_id))
    return {"video": video, "text_ids": ids, "text_mask": mask, "index": torch.arange(batch_size)}


def _build(spec: dict) -> SimpleNamespace:
    """Model + pretraining task + DeepSpeed engine of one configuration, in this process."""
    # imported here, in the measuring process: `violet-ds bench ... --help` stays clear of models and DeepSpeed
    from violet_ds.config import DataConfig, EngineConfig, ModelConfig, OptimConfig, TaskConfig
    from violet_ds.data.tokenizer import load_tokenizer
    from violet_ds.commands.run import seed_everything, setup_world
    from violet_ds.models import build_model
    from violet_ds.engine import deepspeed_engine as dse
    from violet_ds.engine.ds_config import resolve_ds_config
    from violet_ds.tasks import create_task

    torch.set_num_threads(spec["threads"])
    overrides = {}
    if spec.get("overflow_check") is not None:
        # the bf16 per-gradient overflow scan (DeepSpeed's) on or off; unset: what ds_config.py resolves
        overrides = {"bf16": {"check_grad_overflow": bool(spec["overflow_check"])}}
    engine_cfg = EngineConfig(ds_config=spec["ds_config"], precision=spec["precision"],
                              keep_host_memory=spec.get("keep_host_memory", True), ds_overrides=overrides)
    world = setup_world(engine_cfg)
    seed_everything(0)
    tokenizer = load_tokenizer(spec["tokenizer"])
    model_cfg = ModelConfig(name=spec["model"], grad_checkpointing=spec["checkpointing"],
                            offload_activations=spec.get("offload", False), compile=spec.get("compile", False),
                            overrides={"vocab_size": max(tokenizer.vocab_size, 8), "max_frames": max(spec["frames"], 4)})
    model = build_model(model_cfg)
    if spec.get("attention") and hasattr(model, "video_backbone"):
        model.video_backbone.set_attention(spec["attention"])
    task_cfg = TaskConfig(name="pretrain", mvm_targets={"pixel": 1.0}, mvm_strategies=spec["strategies"])
    task = create_task("pretrain", model, task_cfg, tokenizer)
    if world.device.type == "cuda":
        task.to(world.device)
    data_cfg = DataConfig(batch_size=spec["batch_size"])
    optim_cfg = OptimConfig(warmup_steps=0, schedule="constant", optimizer=spec.get("optimizer", "auto"))
    ds_config = resolve_ds_config(engine_cfg, optim_cfg, data_cfg, world)
    engine, optimizer, _, groups = dse.initialize(task, ds_config, optim_cfg, total_steps=10_000, world=world)
    return SimpleNamespace(engine=engine, optimizer=optimizer, groups=groups, model=model, world=world,
                           tokenizer=tokenizer, ds_config=ds_config)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_function(engine, batch: dict, guard) -> Callable[[], None]:
    """One training step on `batch`; with a divergence guard, what the trainer does: flag per step, one check per
    logging window (10 steps)."""
    done = [0]

    def step() -> None:
        loss = engine(batch)["loss"]
        if guard is not None:
            guard.observe(loss)
        engine.backward(loss)
        engine.step()
        if guard is not None:
            done[0] += 1
            guard.end_step(done[0])
            if done[0] % 10 == 0:
                guard.check()

    return step


def _timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> Tuple[List[float], float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones (peak memory counted from the first timed
    step), and the minor page faults per timed step."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    faults = host_memory.minor_page_faults()
    for _ in range(steps):
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times, (host_memory.minor_page_faults() - faults) / steps


def _count_flops(built: SimpleNamespace, batch: dict, spec: dict) -> Tuple[torch.Tensor, float, Optional[int]]:
    """(loss, model FLOPs of one step at the full batch, samples they were counted on) over one forward+backward."""
    engine, model = built.engine, built.model
    if not spec.get("count_flops", True):
        return engine(batch)["loss"], 0, None
    # FlopCounterMode cannot see inside FlexAttention: count with SDPA (same FLOPs, dense windows)
    if hasattr(model, "video_backbone"):
        model.video_backbone.set_attention("sdpa")
    # counted on a probe batch and scaled: the step's FLOPs are linear in the batch once every sample has
    # all its in-batch VTM negatives (violet-v2 bf16 on an H200 counted 24811.7 GFLOP at 16 and 99253.3 at
    # 64, 4.0003x), and a counting pass at the largest batches ran out of memory (256 with checkpointing)
    probe = _flop_probe_size(spec["batch_size"], engine.module)
    probe_batch = batch if probe == spec["batch_size"] else to_device(
        _synthetic_batch(probe, spec["frames"], spec["image_size"], spec["text_len"], built.tokenizer),
        built.world.device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = engine(probe_batch)["loss"]
        engine.backward(loss)
    engine.step()
    return loss, counter.get_total_flops() * spec["batch_size"] / probe, probe


SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
            "equal", "is_nonzero", "allclose")
"""aten ops whose result the host must wait for on an accelerator (`.item()`, `bool(t)`, data-dependent shapes)"""
COPY_OPS = ("copy_", "clone", "_to_copy", "cat", "contiguous")
"""aten ops that only move memory: the copies of a step (`contiguous` dispatches as `clone`)"""
READBACKS = ("cpu", "tolist", "numpy")
"""Tensor methods that read a tensor back to the host (a device-to-host copy and a sync on an accelerator)"""


class OpCounter(TorchDispatchMode):
    """Every aten op dispatched while active (forward, backward, optimizer), by name, and the host reads back:
    `syncs` counts SYNC_OPS and calls of the READBACKS methods (on the CPU `.cpu()` / `.tolist()` dispatch no
    op, so they are counted where they are called)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.readbacks: Counter = Counter()
        self._saved: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in READBACKS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.readbacks[_name] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> Counter:
        found = Counter({name: self.ops[name] for name in SYNC_OPS if self.ops[name]})
        found.update(self.readbacks)
        return found

    @property
    def copies(self) -> int:
        return sum(self.ops[name] for name in COPY_OPS)

    def summary(self, top: int = 15) -> dict:
        return {"ops_per_step": self.total, "host_syncs_per_step": sum(self.syncs.values()),
                "host_syncs": dict(self.syncs), "copies_per_step": self.copies,
                "copies": {name: self.ops[name] for name in COPY_OPS if self.ops[name]},
                "top_ops": self.ops.most_common(top)}


def count_step_ops(step: Callable[[], None]) -> dict:
    """aten ops, host syncs and copies of one `step()` (forward, backward, engine step) under :class:`OpCounter`."""
    counter = OpCounter()
    with counter:
        step()
    return counter.summary()


def _guard_cost_us(guard: DivergenceGuard, loss: torch.Tensor, device: torch.device) -> float:
    """The guard's own work per step, isolated from the (noisy) step time: observe + end_step, and a check every
    10 steps, on a loss tensor of the run's device."""
    probe = loss.detach()
    _sync(device)
    started = time.perf_counter()
    for number in range(1, 2001):
        guard.observe(probe)
        guard.end_step(number)
        if number % 10 == 0:
            guard.check()
    _sync(device)
    return (time.perf_counter() - started) / 2000 * 1e6


def _first_compiled_step(step: Callable[[], None], device: torch.device) -> dict:
    """The first step of a model with compiled blocks: its seconds and what dynamo compiled in it."""
    from violet_ds.models.compile import compile_counters

    started = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - started
    return {"first_step_s": seconds, **compile_counters()}


def measure_step(spec: dict) -> dict:
    """One configuration, in this process: build, warm up, time `steps` steps, count FLOPs (`search`: the
    largest micro-batch that fits instead, :func:`search_max_batch`). With `compile`, the first step is timed on
    its own (compile time) and every graph compiled after it is a recompile; with `count_ops` (eager rows), one
    more step runs under :class:`OpCounter`."""
    if spec.get("search"):
        return search_max_batch(spec)
    built = _build(spec)
    device = built.world.device
    batch = to_device(_synthetic_batch(spec["batch_size"], spec["frames"], spec["image_size"], spec["text_len"],
                                       built.tokenizer), device)
    guard = DivergenceGuard(3, built.world) if spec.get("guard") else None
    step = _step_function(built.engine, batch, guard)
    warmup = spec["warmup"]
    first = None
    if spec.get("compile"):
        first = _first_compiled_step(step, device)
        warmup = max(warmup - 1, 0)
    times, faults = _timed_steps(step, device, warmup, spec["steps"])
    peak = memory_mb(device)
    compiled = {}
    if first is not None:
        from violet_ds.models.compile import compile_counters

        compiled = {"compile_graphs": first["graphs"], "recompiles": compile_counters()["graphs"] - first["graphs"],
                    "compile_s": first["first_step_s"] - sorted(times)[len(times) // 2],
                    "dynamo_compile_s": first["compile_s"], "first_step_s": first["first_step_s"],
                    "compile_cache": {"hits": first["cache_hits"], "misses": first["cache_misses"]}}
    # a TorchDispatchMode cannot run inside compiled graphs (dynamo refuses to trace under one): eager rows only
    ops = count_step_ops(step) if spec.get("count_ops") and not spec.get("compile") else {}
    profile = _profile_step(step, device) if spec.get("profile") else None
    timed_attention = built.model.video_backbone.cfg.attention if hasattr(built.model, "video_backbone") else None
    loss, flops, probe = _count_flops(built, batch, spec)
    guard_us = _guard_cost_us(guard, loss, device) if guard is not None else None
    times.sort()
    median = times[len(times) // 2]
    return {
        "model": spec["model"], "batch_size": spec["batch_size"], "frames": spec["frames"],
        "image_size": spec["image_size"], "text_len": spec["text_len"], "checkpointing": spec["checkpointing"],
        "precision": precision_of(built.ds_config), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": spec["threads"], "params_m": sum(g["num_params"] for g in built.groups) / 1e6,
        "step_s_median": median, "step_s_min": times[0], "samples_per_s": spec["batch_size"] / median,
        "peak_memory_mb": peak, "gflops_per_step": flops / 1e9,
        "achieved_tflops": flops / median / 1e12, "steps": spec["steps"],
        "flops_counted_at_batch": probe,
        "offload": spec.get("offload", False),
        "optimizer": type(getattr(built.optimizer, "optimizer", built.optimizer)).__name__,
        "attention": timed_attention, "profile": profile,
        "loss": float(loss.detach().float()),
        "divergence_guard": bool(spec.get("guard")), "guard_us_per_step": guard_us,
        "compile": bool(spec.get("compile")),
        "keep_host_memory": bool(spec.get("keep_host_memory", True)), "host_memory": host_memory.describe(),
        "page_faults_per_step": faults, **ops, **compiled,
        "overflow_check": bool(built.ds_config.get("bf16", {}).get("check_grad_overflow"))
        if built.ds_config.get("bf16", {}).get("enabled") else None,
        "nonfinite_skip": getattr(built.engine, "nonfinite_skip", None) is not None,
    }


def _profile_step(step, device: torch.device, top: int = 15) -> dict:
    """One step under torch.profiler: the top ops by device (or CPU) self time, and host-sync counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, attribute, 0.0), reverse=True)[:top]
    syncs = {e.key: e.count for e in events
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "aten::item")}
    return {"top_ops_ms": [(e.key, round(getattr(e, attribute, 0.0) / 1000, 2), e.count) for e in ranked],
            "host_syncs": syncs}


def largest_fitting(fits, start: int, limit: int, bisect: int = 3):
    """Largest size in [start, limit] for which `fits(size)` returns a result (None: it does not fit):
    doubling from `start`, then up to `bisect` bisection steps between the last fit and the first failure.
    Returns (largest fitting size or 0, first failing size or None, the largest fit's result)."""
    low, high, best = 0, None, None
    size = start
    while size <= limit:
        result = fits(size)
        if result is None:
            high = size
            break
        low, best = size, result
        size *= 2
    if high is not None and low:
        for _ in range(bisect):
            if high - low <= max(1, low // 16):
                break
            mid = (low + high) // 2
            result = fits(mid)
            if result is None:
                high = mid
            else:
                low, best = mid, result
    return low, high, best


def search_max_batch(spec: dict) -> dict:
    """Largest micro-batch whose step fits (:func:`largest_fitting`), then the median step time there over
    `spec["timed_steps"]` (default 2) steps after one warm-up. An out-of-memory error inside backward leaves ZeRO's reduction
    state half done, so the engine is rebuilt after every failed try."""
    state = {"built": _build(spec)}

    def one_step(batch_size: int) -> dict:
        built = state["built"]
        batch = to_device(_synthetic_batch(batch_size, spec["frames"], spec["image_size"], spec["text_len"],
                                           built.tokenizer), built.world.device)
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        loss = built.engine(batch)["loss"]
        built.engine.backward(loss)
        built.engine.step()
        torch.cuda.synchronize()
        return {"step_s": time.perf_counter() - started, "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}

    def fits(batch_size: int):
        out_of_memory = False
        try:
            return one_step(batch_size)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        finally:
            torch.cuda.empty_cache()
        # rebuilt only here, outside the except block: while it runs, the exception's traceback still holds
        # the failed step's frames and activations (a rebuild in there ran out of memory itself on an H200)
        if out_of_memory:
            destroy = getattr(state["built"].engine, "destroy", None)
            if destroy is not None:
                destroy()
            state["built"] = None
            gc.collect()
            torch.cuda.empty_cache()
            state["built"] = _build(spec)
        return None

    low, high, best = largest_fitting(fits, spec["batch_size"], spec["limit"], spec.get("bisect", 3))
    if not low:
        return {"max_batch": 0, "bounded_by": "memory", "note": f"batch {spec['batch_size']} does not fit"}
    # the search's own step at `low` ran once, cold (allocator growth, kernel choice): time it again, warm
    times = []
    for _ in range(1 + max(1, spec.get("timed_steps", 2))):
        best = fits(low)
        if best is None:
            return {"max_batch": low, "bounded_by": "memory", "note": f"batch {low} fitted once, then ran out of memory"}
        times.append(best["step_s"])
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    return {"max_batch": low, "bounded_by": "memory" if high is not None else f"limit {spec['limit']}",
            "step_s": round(step_s, 3), "samples_per_s": round(low / step_s, 1),
            "peak_memory_mb": round(best["peak_memory_mb"])}


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_in_child(function: Callable[[dict], dict], spec: dict, timeout_s: Optional[float] = None) -> dict:
    """Run `function(spec)` in a fresh spawned process (its own CUDA context and peak memory), a single-rank job
    with no launcher variables from the parent. Raises RuntimeError with the child's error and traceback, or
    TimeoutError when no result came within `timeout_s` (None: wait as long as it takes)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child_main, args=(function, spec, queue))
    saved = {key: os.environ.pop(key) for key in LAUNCHER_VARIABLES if key in os.environ}
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


def _child_main(function: Callable[[dict], dict], spec: dict, queue) -> None:
    try:
        queue.put(("ok", function(spec)))
    except BaseException as error:  # reported by the parent with the configuration that failed
        queue.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"))


def _on_off(value) -> str:
    return "-" if value is None else ("on" if value else "off")


def _count(row: dict, key: str) -> str:
    return "-" if row.get(key) is None else str(row[key])


def _seconds(row: dict, key: str) -> str:
    return "-" if row.get(key) is None else f"{row[key]:.1f}"


def top_ops_lines(row: dict, top: int = 12) -> List[str]:
    """The most frequent aten ops of a row counted with `count_ops`, and its host syncs."""
    if not row.get("top_ops"):
        return []
    ops = ", ".join(f"{name} {count}" for name, count in row["top_ops"][:top])
    return [f"  {row['model']} ops/step {row['ops_per_step']} (host syncs {row['host_syncs']}, copies "
            f"{row['copies']}): {ops}"]


def format_table(rows: List[dict]) -> str:
    """The table `bench train` prints: one line per measured configuration."""
    header = (f"{'model':<12} {'batch':>5} {'frames':>6} {'size':>5} {'ckpt':>5} {'guard':>5} {'comp':>5} {'heap':>5} "
              f"{'prec':>5} {'scan':>5} {'params M':>9} {'step s':>8} {'samples/s':>10} {'peak MB':>9} {'GFLOP/step':>11} "
              f"{'TFLOP/s':>8} {'ops/step':>9} {'syncs':>6} {'copies':>7} {'compile s':>10} {'graphs':>7} {'recomp':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<12} {r['batch_size']:>5} {r['frames']:>6} {r['image_size']:>5} "
                     f"{'on' if r['checkpointing'] else 'off':>5} {'on' if r.get('divergence_guard') else 'off':>5} "
                     f"{'on' if r.get('compile') else 'off':>5} "
                     f"{'keep' if r.get('keep_host_memory', True) else 'free':>5} "
                     f"{r['precision']:>5} {_on_off(r.get('overflow_check')):>5} {r['params_m']:>9.2f} "
                     f"{r['step_s_median']:>8.3f} {r['samples_per_s']:>10.2f} {r['peak_memory_mb']:>9.0f} "
                     f"{r['gflops_per_step']:>11.1f} {r['achieved_tflops']:>8.3f} {_count(r, 'ops_per_step'):>9} "
                     f"{_count(r, 'host_syncs_per_step'):>6} {_count(r, 'copies_per_step'):>7} "
                     f"{_seconds(r, 'compile_s'):>10} {_count(r, 'compile_graphs'):>7} {_count(r, 'recompiles'):>7}")
    for r in rows:
        lines += top_ops_lines(r)
    return "\n".join(lines)


def _progress_line(spec: dict, row: dict) -> str:
    on = {True: "on", False: "off"}
    line = (f"  {spec['model']} checkpointing={on[spec['checkpointing']]} guard={on[spec['guard']]} "
            f"compile={on[spec['compile']]} heap={'keep' if spec['keep_host_memory'] else 'free'}: "
            f"{row['step_s_median']:.3f} s/step, {row['peak_memory_mb']:.0f} MB")
    line += f", guard {row['guard_us_per_step']:.1f} us/step" if spec["guard"] else ""
    line += f", overflow scan {_on_off(row.get('overflow_check'))}"
    line += f", {row['ops_per_step']} ops/step, {row['host_syncs_per_step']} host syncs" if "ops_per_step" in row else ""
    if row.get("compile_graphs") is not None:
        cache = row.get("compile_cache", {})
        line += (f", compile {row['compile_s']:.1f} s, {row['compile_graphs']} graphs, "
                 f"{row['recompiles']} recompiles, inductor cache {cache.get('hits', 0)} hits / "
                 f"{cache.get('misses', 0)} misses")
    return line


def bench_train(models: Sequence[str] = ("violet-tiny",), batch_size: int = 2, frames: int = 4, image_size: int = 224,
                text_len: int = 32, checkpointing: Sequence[bool] = (False, True), steps: int = 3, warmup: int = 1,
                precision: str = "bf16", ds_config: str = "auto", divergence_guard: Sequence[bool] = (False,),
                compile: Sequence[bool] = (False,), keep_host_memory: Sequence[bool] = (True,),
                tokenizer: Optional[str] = None, strategies: Sequence[str] = ("rm", "bm"), threads: int = 2,
                output: Optional[str] = "runs/bench/bench_train.json", count_ops: bool = False,
                overflow_check: Sequence[Optional[bool]] = (None,), count_flops: bool = True) -> List[dict]:
    """One row per model and combination of the settings to compare (`violet-ds bench train` documents them),
    each measured in a fresh process (:func:`measure_step`); a line per row as it finishes. The rows, each with
    the run's `meta`, are written to `output` (when given) and returned."""
    if ds_config == "auto":
        on_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        ds_config = "zero2_bf16.json" if on_cuda else "cpu_test.json"
    rows = []
    for model in models:
        for flag, guarded, compiled, keep, scan in itertools.product(checkpointing, divergence_guard, compile,
                                                                     keep_host_memory, overflow_check):
            spec = {"model": model, "batch_size": batch_size, "frames": frames, "image_size": image_size,
                    "text_len": text_len, "checkpointing": flag, "steps": steps, "warmup": warmup,
                    "precision": precision, "ds_config": ds_config, "tokenizer": tokenizer,
                    "strategies": list(strategies), "threads": threads, "guard": guarded, "compile": compiled,
                    "keep_host_memory": keep, "count_ops": count_ops, "overflow_check": scan,
                    "count_flops": count_flops}
            try:
                rows.append(run_in_child(measure_step, spec))
            except RuntimeError as error:
                raise RuntimeError(f"bench train {model} (checkpointing={flag}) failed: {error}") from None
            print(_progress_line(spec, rows[-1]), flush=True)
    meta = bench_meta()
    for row in rows:
        row["meta"] = meta
    if output:
        write_results(output, rows)
    return rows
