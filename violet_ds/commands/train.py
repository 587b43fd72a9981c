"""`violet-ds pretrain | finetune | evaluate`: the commands, their options and the checks before any import.

The parsed configuration is checked here before torch and DeepSpeed are imported (`check_before_import`: the
bounds of every numeric setting, a training source, a live run holding the run directory), so that a
configuration error is printed within a second or two instead of after the imports; then
`violet_ds.commands.run`, which builds and runs everything (`run.train`, `run.evaluate_weights`), is imported
and called under the rank guard. This module imports only the configuration dataclasses and light helpers
(`tests/test_bad_inputs.py` checks that parsing and these checks import no torch). Python callers may call
these functions or `run.train` directly (`run.train` makes the same value checks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from ..config import DataConfig, EngineConfig, ModelConfig, OptimConfig, RunConfig, TaskConfig, check_values

# engine.guard and .run import torch and DeepSpeed (5-8 s): each command imports them after its checks; the lock
# check (engine.rundir: socket, threading) is imported where it runs, so that --help and the parser go without it


def _launcher_rank() -> int:
    """This process's rank as the launcher set it (torchrun / DeepSpeed: RANK; srun: SLURM_PROCID), 0 alone."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def check_before_import(command: str, model: ModelConfig, data: DataConfig, task: TaskConfig, optim: OptimConfig,
                        engine: EngineConfig, run: RunConfig) -> None:
    """The checks of a training or evaluation configuration that need no torch: value bounds
    (`config.check_values`), and for training a source in `data.train` and no live run holding the run
    directory (rank 0 of a launch reads `run.lock`; the lock itself is taken later, by `run.train`)."""
    check_values(model=model, data=data, task=task, optim=optim, engine=engine, run=run)
    if command == "evaluate":
        return
    if not data.train:
        raise ValueError(f"{command}: data.train is empty (give at least one {{tsv, annotations}} source)")
    if _launcher_rank() == 0:
        from ..engine.rundir import RunLock

        RunLock(Path(run.output_dir) / run.name).check()


def pretrain(model: ModelConfig, data: DataConfig, task: TaskConfig, optim: OptimConfig, engine: EngineConfig,
             run: RunConfig, resolved_config: Optional[str] = None) -> None:
    """Pretrain a model (VIOLET / VIOLETv2 / LAVENDER / VIMPAC) with DeepSpeed ZeRO-2.

    `--config NAME` runs a packaged recipe (`violet-ds recipes`; pretrain_demo runs the tiny model on the demo
    data on CPU).
    Writes runs/<run.name>/: config.yaml, ds_config.json, tensorboard/, checkpoints/, metrics.jsonl,
    log.txt. `--run.resume auto` continues an interrupted run exactly.
    """
    check_before_import("pretrain", model, data, task, optim, engine, run)
    from ..engine.guard import run_guarded
    from .run import train

    run_guarded(train, model, data, task, optim, engine, run, command="pretrain", resolved_config=resolved_config)


def finetune(model: ModelConfig, data: DataConfig, task: TaskConfig, optim: OptimConfig, engine: EngineConfig,
             run: RunConfig, resolved_config: Optional[str] = None) -> None:
    """Finetune on a downstream task, starting from `run.init_from` (a pretraining run, export or official
    checkpoint) or `model.weights`; evaluates on data.val during training and writes the same run dir."""
    check_before_import("finetune", model, data, task, optim, engine, run)
    if not run.init_from and not model.weights and not run.resume:
        print("warning: finetuning from random weights (set run.init_from or model.weights)", flush=True)
    from ..engine.guard import run_guarded
    from .run import train

    run_guarded(train, model, data, task, optim, engine, run, command="finetune", resolved_config=resolved_config)


def evaluate(model: ModelConfig, data: DataConfig, task: TaskConfig, optim: OptimConfig, engine: EngineConfig,
             run: RunConfig, split: Literal["train", "val", "test"] = "val") -> None:
    """Evaluate weights (`run.init_from`: run dir, checkpoint, export or official file; or `model.weights`)
    on `data.<split>`; writes runs/<run.name>/eval_<split>.json (metrics) and prints them. Takes the same
    YAML as training (the `optim` section is accepted and unused).

    Args:
        split: which data sources to evaluate on: train, val or test.
    """
    check_before_import("evaluate", model, data, task, optim, engine, run)
    from ..engine.guard import run_guarded
    from .run import evaluate_weights

    run_guarded(evaluate_weights, model, data, task, engine, run, split)
