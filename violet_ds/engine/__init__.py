"""Training engine: distributed setup, the DeepSpeed ZeRO-2 engine, the one training loop, evaluation,
logging, checkpoints and export. It imports no task, target or CLI module: the commands that assemble a
run live in `violet_ds.commands`.

Modules (imported lazily by the CLI; only this package needs DeepSpeed):
- `distributed`: `init_distributed() -> World` from torchrun / DeepSpeed launcher / SLURM variables;
- `ds_config`: the resolved DeepSpeed config (every "auto" filled from the run config);
- `optim`: AdamW parameter groups, the optimizer implementation, the LR schedule;
- `deepspeed_engine`: `initialize` (deepspeed.initialize with the two above), loss scale, gradient norm;
- `trainer`: `Trainer.fit(resume=...)`, the loop for every task;
- `evaluator`: `evaluate(task, loaders, world)`, `gather_outputs` for tasks' `evaluate_end`;
- `logging`: TensorBoard + metrics.jsonl + log.txt of a run directory, progress (bars on terminals,
  step lines elsewhere);
- `checkpoint`: the one owner of checkpoint state (safe loading, tags, `latest` only once complete, RNG
  streams, client state, resume checks);
- `export`: checkpoint -> safetensors; `universal`: universal checkpoints; `guard`: rank-failure handling;
  `divergence`, `rundir`, `preflight`, `stall`: run safety and stall warnings.
- `host_memory`: CPU runs keep freed host memory (no page faults on the step's large buffers).
"""
