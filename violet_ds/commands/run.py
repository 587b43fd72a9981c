"""`violet-ds pretrain | finetune | evaluate`: build everything from the run config and hand it to the loop.

Order matters for exact resume: seeds, model, task, data, DeepSpeed engine, then the checkpoint
(which restores weights, optimizer, the schedule's step, data cursor and RNG states last; the LR schedule
itself is this run's config, see `Trainer.load_checkpoint`).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from .. import errors, paths
from ..config import DataConfig, EngineConfig, ModelConfig, OptimConfig, RunConfig, TaskConfig, check_values
from ..data.datasets import collate
from ..data.loaders import SeededSamples, data_loader, read_clips_as_extracted, sidecar_paths
from ..data.sampler import ResumableDistributedSampler, SampleCursor
from ..data.sidecars import SidecarCollate, open_sidecars
from ..data.tokenizer import Tokenizer
from ..engine import checkpoint as ckpt
from ..engine import deepspeed_engine as dse
from ..engine import host_memory, preflight
from ..engine.distributed import World, env_single_process, init_distributed
from ..engine.ds_config import precision_of, resolve_ds_config
from ..engine.evaluator import evaluate as run_evaluation
from ..engine.export import read_weights
from ..engine.guard import PreemptionSafeLoader, ignore_preemption_signals
from ..engine.logging import RunLogger
from ..engine.rundir import RunLock, check_fresh_run
from ..engine.trainer import Trainer, TrainSummary, steps_per_epoch
from ..engine.universal import configure_load
from ..models import build_model
from ..registry import TASKS
from ..tasks import create_task
from ..weights import KeyReport, load_checked


# ----------------------------------------------------------------------------------------- setup
def setup_world(engine: EngineConfig) -> World:
    """init_distributed; a single process still gets a (1-rank) process group, which DeepSpeed needs. A CPU run
    keeps freed host memory (`engine.keep_host_memory`) before it allocates anything large."""
    env_single_process()
    world = init_distributed(timeout_s=engine.dist_timeout_s)
    if world.device.type == "cpu" and engine.keep_host_memory:
        host_memory.keep_freed_memory()
    return world


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_init_weights(task: torch.nn.Module, path: str, logger: Optional[RunLogger] = None) -> KeyReport:
    """Initialise task weights from a run / checkpoints / tag dir, a model dir, an exported safetensors or an
    official .pt (the weights entry `engine.export.read_weights`; weights with a NaN/Inf value are refused).

    Keys are matched by name (`model.*`, `heads.*`); heads absent from the file (a new downstream head) or
    of another shape there are initialised and reported (`report.initialised`), never silently assumed; keys
    of the file the task lacks are reported too (`report.unexpected`). A backbone key that does not fit is an
    error naming it.
    """
    state = read_weights(path).state
    if not any(key.startswith(("model.", "heads.")) for key in state):
        state = {f"model.{key}": value for key, value in state.items()}
    report = load_checked(task, state, f"{path}: backbone weights", allow_unexpected=True,
                          initialise=lambda key: not key.startswith("model."))
    if logger is not None:
        new, unused, reshaped = report.initialised, report.unexpected, sorted(report.mismatched)
        logger.info(f"init_from {path}: {report.loaded} tensors loaded; newly initialised: "
                    f"{new[:8]}{'...' if len(new) > 8 else ''}; unused: {unused[:8]}"
                    f"{'...' if len(unused) > 8 else ''}; shape mismatch (re-initialised): {reshaped}")
    return report


def build_backbone(model: ModelConfig) -> torch.nn.Module:
    """`models.build_model` with `model.weights` read by the weights entry (any kind `run.init_from` takes)."""
    return build_model(model, weights=read_weights(model.weights) if model.weights else None)


# ----------------------------------------------------------------------------------------- data
def prepare_sidecars(datasets: Mapping[str, Dataset], data: DataConfig, split: str) -> Dict[str, Any]:
    """Open the split's `targets:` sidecars and make the clips they describe read the way extraction read
    them (`violet_ds.data.loaders.read_clips_as_extracted`). Returns {target name: TargetStore}, empty
    without sidecars."""
    paths = [path for source in data.sources(split) for path in sidecar_paths(source)]
    if not paths:
        return {}
    stores = open_sidecars(paths, data.num_frames, data.image_size)
    read_clips_as_extracted(datasets, data, split)
    return stores


def _loader(dataset: Dataset, sampler, data: DataConfig, batch_size: int, world: World, seed: int,
            drop_last: bool, stores: Optional[Mapping[str, Any]] = None) -> DataLoader:
    """`violet_ds.data.loaders.data_loader` with the sidecar targets of `stores` attached to each batch."""
    collate_fn = collate
    if stores:
        collate_fn = SidecarCollate(collate, dict(stores))
    # workers ignore SIGTERM / SIGINT so that a preempted or interrupted run can finish its step and save; a
    # worker's error or a wait over data.loader_timeout_s stops them and ends the run with one line
    return data_loader(dataset, sampler, data, batch_size, seed=seed, drop_last=drop_last,
                       pin_memory=world.device.type == "cuda", collate_fn=collate_fn,
                       worker_init_fn=ignore_preemption_signals,
                       loader_class=functools.partial(PreemptionSafeLoader, stall_s=data.loader_timeout_s))


def eval_loaders(datasets: Mapping[str, Dataset], data: DataConfig, world: World, seed: int,
                 split: str = "val") -> Dict[str, DataLoader]:
    stores = prepare_sidecars(datasets, data, split)
    loaders = {}
    for name, dataset in datasets.items():
        sampler = ResumableDistributedSampler(len(dataset), world.rank, world.world_size, seed, shuffle=False,
                                              drop_last=False)
        loaders[name] = _loader(dataset, sampler, data, data.eval_batch_size or data.batch_size, world, seed,
                                drop_last=False, stores=stores)
    return loaders


# ----------------------------------------------------------------------------------------- commands
def _claim_run_dir(run_dir: Path, run: RunConfig, command: str, world: World):
    """Rank 0 locks the run directory (refusing a live one) and refuses to silently replace checkpoints."""
    if not world.is_main:
        return None

    lock = RunLock(run_dir, command=f"violet-ds {command} (run {run.name})",
                   warn=lambda message: print(f"warning: {message}", flush=True)).acquire()
    atexit.register(lock.release)
    try:
        if not run.resume:
            check_fresh_run(run_dir, run.overwrite, warn=lambda message: print(f"warning: {message}", flush=True))
    except BaseException:
        lock.release()
        raise
    return lock


def _summary_line(key: str, value: Any) -> str:
    return f"  {key:<18}{value}"


def train(model: ModelConfig, data: DataConfig, task: TaskConfig, optim: OptimConfig, engine: EngineConfig,
          run: RunConfig, command: str = "pretrain", resolved_config: Optional[str] = None) -> Dict[str, Any]:
    """Shared body of pretrain and finetune; returns the summary dict (also printed by rank 0).

    `resolved_config` is the YAML the run records as config.yaml (the CLI's; from Python, the sections dumped).
    """
    started = time.time()
    _check_train_config(command, model, data, task, optim, engine, run)
    model, data, engine, run, config_text = _absolute_paths(
        command, model, data, engine, run,
        resolved_config or _dump_config(model=model, data=data, task=task, optim=optim, engine=engine, run=run))
    run_dir = Path(run.output_dir) / run.name
    # before any heavy work: a resume that cannot happen is an error now, not after model building
    resume_tag = ckpt.resolve_resume_tag(run_dir / "checkpoints", run.resume) if run.resume else None
    world = setup_world(engine)
    lock = _claim_run_dir(run_dir, run, command, world)
    logger = _open_run(run_dir, run, model, data, world, resume_tag, config_text,
                       reads_frames=_task_class(task.name).reads_frames)
    if engine.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    task_module, tokenizer = _build_task(model, task, data, engine, run, world, logger, resuming=resume_tag is not None)
    train_data = _train_data(task_module, tokenizer, data, engine, run, world, logger)
    total_steps = run.max_steps if run.max_steps is not None else run.epochs * train_data.steps_per_epoch
    ds_config = resolve_ds_config(engine, optim, data, world)
    if world.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    ds_engine, optimizer, scheduler, groups = _build_engine(task_module, ds_config, optim, run, world, run_dir,
                                                            total_steps)
    logger.info(_run_line(command, model, task, world, train_data, total_steps, groups, ds_config, optimizer))
    if run.preflight and world.is_main:
        preflight.check_checkpoint_space(run_dir / "checkpoints", ckpt.expected_checkpoint_bytes(ds_engine.module),
                                         run.keep_last, logger.warning)
    trainer = Trainer(engine=ds_engine, scheduler=scheduler, make_loader=train_data.make_loader,
                      micro_per_epoch=train_data.micro_per_epoch, world=world, run=run, run_dir=run_dir,
                      logger=logger, batch_size=data.batch_size, grad_accum=engine.grad_accum,
                      total_steps=total_steps, resolved_config=config_text, val_loaders=train_data.val_loaders,
                      command=command)
    try:
        result = trainer.fit(resume=run.resume)
    except BaseException as error:
        # summary.json says why the run ended, whatever ended it (no collective here: a peer may be gone)
        if world.is_main:
            _summary_on_error(command, run_dir, trainer, train_data, started, error)
        raise
    finally:
        logger.close()
    summary = _summary(command, run_dir, result, trainer, train_data, world, started)
    # Ctrl-C: the trainer finished the step, saved and logged that one line; no summary block, exit code 130
    interrupted = result.stop_signal == "SIGINT"
    if world.is_main:
        if interrupted:
            if not _did_nothing(run_dir, result):
                _write_summary(run_dir, summary)
        else:
            _report(command, run_dir, result, summary, total_steps)
    if lock is not None:
        lock.release()
    if interrupted:
        raise errors.Interrupted()
    return summary


def _task_class(name: str) -> type:
    """The registered task class (its declared attributes, before anything is built)."""
    return TASKS.get(name)


def _check_train_config(command: str, model: ModelConfig, data: DataConfig, task: TaskConfig, optim: OptimConfig,
                        engine: EngineConfig, run: RunConfig) -> None:
    """The value checks the CLI makes before importing torch (`commands.train`), for callers from Python."""
    check_values(model=model, data=data, task=task, optim=optim, engine=engine, run=run)
    if not data.train:
        raise ValueError(f"{command}: data.train is empty (give at least one {{tsv, annotations}} source)")


def _absolute_paths(command: str, model: ModelConfig, data: DataConfig, engine: EngineConfig, run: RunConfig,
                    config_text: str):
    """Copies of the sections and of the resolved YAML with every path absolute (`violet_ds.paths`), so that
    the run directory's config.yaml works from any directory; its first line says where the run started."""
    sections = copy.deepcopy({"model": model, "data": data, "engine": engine, "run": run})
    paths.make_absolute(sections)
    recorded = paths.make_absolute(yaml.safe_load(config_text) or {})
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = paths.run_config_header(command, when) + yaml.safe_dump(recorded, sort_keys=False)
    return sections["model"], sections["data"], sections["engine"], sections["run"], text


def _dump_config(**sections: Any) -> str:
    """The run's configuration as YAML when no resolved YAML was handed in (a run started from Python)."""
    return yaml.safe_dump({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                           for k, v in sections.items()}, sort_keys=False)


def _open_run(run_dir: Path, run: RunConfig, model: ModelConfig, data: DataConfig, world: World,
              resume_tag: Optional[str], config_text: str, reads_frames: bool = True) -> RunLogger:
    """The run's logger; the resume and path checks, before any heavy work; config.yaml."""
    purge_step = None
    if resume_tag is not None:
        marker = json.loads((run_dir / "checkpoints" / resume_tag / ckpt.COMPLETE_MARKER).read_text())
        purge_step = int(marker.get("step") or 0) + 1
    logger = RunLogger(run_dir, world, purge_step=purge_step, level=run.log_level, config_text=config_text)
    if resume_tag is not None:
        # an inexact resume is an error (or, when allowed, a warning per difference)
        ckpt.check_resume(run_dir / "checkpoints", resume_tag, config_text, world.world_size,
                          run.allow_inexact_resume, logger.warning)
    if run.preflight:
        preflight.preflight_paths(data, run, model, run_dir, resuming=resume_tag is not None,
                                  reads_frames=reads_frames)
    if world.is_main:
        (run_dir / "config.yaml").write_text(config_text)
    if world.device.type == "cpu":
        logger.info(f"host memory: {host_memory.describe()}")
    return logger


def _build_task(model: ModelConfig, task: TaskConfig, data: DataConfig, engine: EngineConfig, run: RunConfig,
                world: World, logger: RunLogger, resuming: bool):
    """(task module, tokenizer): identical initial weights on every rank, then per-rank random streams."""
    seed_everything(engine.seed)
    tokenizer = Tokenizer(data.tokenizer)
    backbone = build_backbone(model)
    task_module = create_task(task.name, backbone, task, tokenizer, tie_mlm_head=model.tie_mlm_head)
    if run.init_from and not resuming:
        load_init_weights(task_module, run.init_from, logger)
    # streams for masking and dropout differ per rank
    seed_everything(engine.seed + 1 + world.rank)
    return task_module, tokenizer


@dataclasses.dataclass
class _TrainData:
    """What the trainer reads: a resumable loader per epoch, validation loaders on demand."""

    datasets: Dict[str, Dataset]
    samples: int
    micro_per_epoch: int
    """micro-batches per rank and epoch"""
    steps_per_epoch: int
    make_loader: Callable[[SampleCursor], DataLoader]
    val_loaders: Optional[Callable[[], Dict[str, DataLoader]]]


def _train_data(task_module, tokenizer, data: DataConfig, engine: EngineConfig, run: RunConfig, world: World,
                logger: RunLogger) -> _TrainData:
    datasets = task_module.build_datasets(data, tokenizer, "train")
    preflight.check_split_sizes("train", datasets, data.train)
    train_stores = prepare_sidecars(datasets, data, "train")
    if train_stores:
        logger.info("MVM targets from sidecars (live teacher for batches not fully covered): " +
                    ", ".join(f"{name} <- {store.path} ({store.num_done()}/{len(store)} rows)"
                              for name, store in train_stores.items()))
    train_set = SeededSamples(next(iter(datasets.values())), engine.seed)
    sampler = ResumableDistributedSampler(len(train_set), world.rank, world.world_size, engine.seed, shuffle=True,
                                          drop_last=True)
    micro_per_epoch = len(sampler) // data.batch_size

    def make_loader(cursor: SampleCursor) -> DataLoader:
        sampler.seek(cursor, data.batch_size)
        train_set.epoch = cursor.epoch
        return _loader(train_set, sampler, data, data.batch_size, world, engine.seed * 7919 + cursor.epoch,
                       drop_last=True, stores=train_stores)

    return _TrainData(datasets=datasets, samples=len(train_set), micro_per_epoch=micro_per_epoch,
                      steps_per_epoch=steps_per_epoch(micro_per_epoch, engine.grad_accum), make_loader=make_loader,
                      val_loaders=_val_loaders(task_module, tokenizer, data, engine, run, world))


def _val_loaders(task_module, tokenizer, data: DataConfig, engine: EngineConfig, run: RunConfig,
                 world: World) -> Optional[Callable[[], Dict[str, DataLoader]]]:
    """The validation loaders, built at the first evaluation (None without data.val)."""
    if not data.val:
        return None
    val_sets: Dict[str, Dataset] = {}
    if run.preflight:
        # built now, so that a missing or empty val split fails before training, not at the first evaluation
        with preflight.preserved_rng():
            val_sets = task_module.build_datasets(data, tokenizer, "val")
        preflight.check_split_sizes("val", val_sets, data.val)
    cache: Dict[str, DataLoader] = {}

    def make_val_loaders() -> Dict[str, DataLoader]:
        if not cache:
            cache.update(eval_loaders(val_sets or task_module.build_datasets(data, tokenizer, "val"),
                                      data, world, engine.seed))
        return cache

    return make_val_loaders


def _build_engine(task_module, ds_config: dict, optim: OptimConfig, run: RunConfig, world: World, run_dir: Path,
                  total_steps: int):
    """deepspeed.initialize of the task on its device: (engine, optimizer, scheduler, parameter groups)."""
    frozen = task_module.frozen_modules()
    if world.device.type == "cuda":
        task_module.to(world.device)
        task_module.move_teachers(world.device, precision_of(ds_config))
    # a universal checkpoint (another world size) needs DeepSpeed's load_universal for this one load
    init_config = configure_load(ds_config, run_dir / "checkpoints", run.resume)
    return dse.initialize(task_module, init_config, optim, total_steps, world, frozen)


def _run_line(command: str, model: ModelConfig, task: TaskConfig, world: World, train_data: _TrainData,
              total_steps: int, groups: list, ds_config: dict, optimizer) -> str:
    trainable = sum(g["num_params"] for g in groups)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    return (f"{command}: model {model.name}, task {task.name}, {trainable / 1e6:.2f}M trainable parameters in "
            f"{len(groups)} groups, {train_data.samples} samples, {train_data.steps_per_epoch} steps/epoch, "
            f"{total_steps} steps, world {world.world_size}, precision {precision_of(ds_config)}, ZeRO stage "
            f"{ds_config['zero_optimization']['stage']}, optimizer {type(inner).__name__}")


SUMMARY_FILE = "summary.json"


def end_of_run(result: TrainSummary, error: Optional[BaseException] = None) -> str:
    """Why a run ended, as summary.json's `end` records it: finished, preempted (SIGTERM / SIGUSR1: saved and
    stopped, resumable), stopped (SIGINT), diverged (the divergence guard) or failed (any other error)."""
    if result.preempted:
        return "stopped" if result.stop_signal == "SIGINT" else "preempted"
    if error is None:
        return "finished"
    if isinstance(error, KeyboardInterrupt):
        return "stopped"
    if any(cls.__name__ == "DivergenceError" for cls in type(error).__mro__):
        return "diverged"
    return "failed"


def _latest_checkpoint(run_dir: Path) -> Optional[str]:
    """The checkpoint `latest` names at the end of the run (what resume, export and predict take), or None."""
    try:
        tag = ckpt.read_latest(run_dir / "checkpoints")
    except ckpt.CheckpointError:
        return None
    return str(run_dir / "checkpoints" / tag) if tag else None


def _summary(command: str, run_dir: Path, result: TrainSummary, trainer: Trainer, train_data: _TrainData,
             world: Optional[World], started: float, error: Optional[BaseException] = None) -> Dict[str, Any]:
    """summary.json of a run; `world` None: bad samples of this rank only (no collective)."""
    end = end_of_run(result, error)
    return {
        "command": command, "run_dir": str(run_dir), "end": end,
        "error": errors.message_of(error) if error is not None and end in ("diverged", "failed") else None,
        "steps": result.steps, "start_step": result.start_step, "epochs": result.epochs_done,
        "first_loss": result.first_loss, "last_loss": result.last_loss, "skipped_steps": result.skipped_steps,
        "preempted": result.preempted, "checkpoint": _latest_checkpoint(run_dir),
        "tensorboard": str(run_dir / "tensorboard"),
        "val": result.val_metrics, "wall_s": round(time.time() - started, 1),
        "train_samples": train_data.samples,
        "divergence": trainer.divergence.report(),
        "stall": trainer.stall.report(),
        "bad_samples": preflight.bad_sample_totals(train_data.datasets, world),
    }


def _did_nothing(run_dir: Path, result: TrainSummary) -> bool:
    """A resumed run that trained no step: the summary.json of the run that did the work stays."""
    return result.start_step > 0 and result.steps == result.start_step and (run_dir / SUMMARY_FILE).is_file()


def _finite_json(value: Any) -> Any:
    """`value` with every NaN / Inf float replaced by None: JSON has no such numbers (json.dumps would write
    `NaN`, which strict parsers refuse)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    return value


def _write_summary(run_dir: Path, summary: Dict[str, Any]) -> None:
    tmp = run_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(_finite_json(summary), indent=2, default=str, allow_nan=False))
    os.replace(tmp, run_dir / SUMMARY_FILE)


def _summary_on_error(command: str, run_dir: Path, trainer: Trainer, train_data: _TrainData, started: float,
                      error: BaseException) -> None:
    """Rank 0, when `fit` raised: summary.json with what the run did and why it ended (never masks `error`)."""
    result = trainer.summary
    if _did_nothing(run_dir, result):
        return
    try:
        _write_summary(run_dir, _summary(command, run_dir, result, trainer, train_data, None, started, error))
    except Exception as problem:  # noqa: BLE001 - the run's own error is the one to report
        print(f"warning: could not write {run_dir / SUMMARY_FILE}: {problem}", file=sys.stderr, flush=True)


def _report(command: str, run_dir: Path, result: TrainSummary, summary: Dict[str, Any], total_steps: int) -> None:
    """Rank 0: the end-of-run summary on stdout and in summary.json (kept when a resumed run had nothing to do)."""
    if _did_nothing(run_dir, result):
        print(f"violet-ds {command}: nothing to train: the run is already at step {result.steps}/{total_steps} "
              f"(checkpoint {summary['checkpoint']}); {run_dir / SUMMARY_FILE} is kept", flush=True)
        return
    losses = result.losses
    curve = ", ".join(f"{value:.3f}" for value in losses[:: max(1, len(losses) // 10)]) if losses else "-"
    lines = [f"violet-ds {command} finished" + (" (stopped by a signal, resumable)" if result.preempted else ""),
             _summary_line("run dir", run_dir), _summary_line("steps", f"{result.steps}/{total_steps}"),
             _summary_line("loss", f"{result.first_loss} -> {result.last_loss}" if losses else "-"),
             _summary_line("loss curve", curve),
             _summary_line("skipped steps", result.skipped_steps),
             _summary_line("checkpoint", summary["checkpoint"]),
             _summary_line("wall time", f"{summary['wall_s']} s")]
    if result.val_metrics:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.val_metrics.items()))
        lines.append(_summary_line("validation", metrics))
    lines.append(_summary_line("tensorboard", f"tensorboard --logdir {run_dir / 'tensorboard'}"))
    print("\n".join(lines), flush=True)
    _write_summary(run_dir, summary)


def evaluate_weights(model: ModelConfig, data: DataConfig, task: TaskConfig, engine: EngineConfig, run: RunConfig,
                     split: str) -> None:
    """The body of `violet-ds evaluate` (commands/train.py): metrics of the weights on `data.<split>`."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if not data.sources(split):
        raise ValueError(f"evaluate: data.{split} is empty")
    check_values(model=model, data=data, task=task, engine=engine, run=run)
    world = setup_world(engine)
    seed_everything(engine.seed)
    run_dir = Path(run.output_dir) / run.name
    logger = RunLogger(run_dir, world, level=run.log_level)
    tokenizer = Tokenizer(data.tokenizer)
    task_module = create_task(task.name, build_backbone(model), task, tokenizer,
                              tie_mlm_head=model.tie_mlm_head)
    if run.init_from:
        load_init_weights(task_module, run.init_from, logger)
    elif not model.weights:
        logger.warning("evaluating random weights (set run.init_from or model.weights)")
    task_module.to(world.device)
    if world.device.type == "cuda" and engine.precision in ("bf16", "auto"):
        task_module.to(torch.bfloat16)
    datasets = task_module.build_datasets(data, tokenizer, split)
    preflight.check_split_sizes(split, datasets, data.sources(split))
    loaders = eval_loaders(datasets, data, world, engine.seed, split)
    metrics = run_evaluation(task_module, loaders, world, max_batches=run.val_max_batches, progress=run.progress)
    if world.is_main:
        (run_dir / f"eval_{split}.json").write_text(json.dumps(metrics, indent=2))
        rows = task_module.predictions()
        if rows:
            with open(run_dir / f"predictions_{split}.jsonl", "w") as handle:
                for row in rows:
                    handle.write(json.dumps(row, default=str) + "\n")
        print(f"violet-ds evaluate ({task.name}, {split}): " +
              ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())), flush=True)
        print(_summary_line("metrics", run_dir / f"eval_{split}.json"), flush=True)
    logger.close()
