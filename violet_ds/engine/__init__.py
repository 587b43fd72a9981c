"""Training engine: distributed setup, the DeepSpeed ZeRO-2 engine, the one training loop, evaluation,
logging, checkpoints and export. It imports no task, target or CLI module: the commands that assemble a
run live in `violet_ds.commands`.

Modules (imported lazily by the CLI; only this package needs DeepSpeed):
- `distributed`: `init_distributed() -> World` from torchrun / DeepSpeed launcher / SLURM variables;
- `deepspeed_engine`: resolved ds_config, optimizer + parameter groups, LR schedule, `initialize`,
  checkpoints that become `latest` only when complete, RNG state capture;
- `trainer`: `Trainer.fit(resume=...)`, the loop for every task;
- `evaluator`: `evaluate(task, loaders, world)`, `gather_outputs` for tasks' `evaluate_end`;
- `logging`: TensorBoard + metrics.jsonl + log.txt of a run directory, progress (bars on terminals,
  step lines elsewhere);
- `checkpoint`: the one owner of checkpoint state (safe loading, tags, `latest`, resume checks);
- `export`: checkpoint -> safetensors; `universal`: universal checkpoints; `guard`: rank-failure handling;
  `divergence`, `rundir`, `preflight`, `stall`: run safety and stall warnings.
"""
