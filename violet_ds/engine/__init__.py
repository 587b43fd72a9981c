"""Training engine: distributed setup, the DeepSpeed ZeRO-2 engine, the one training loop, evaluation,
logging, export and benchmarks.

Modules (imported lazily by the CLI; only this package needs DeepSpeed):
- `distributed`: `init_distributed() -> World` from torchrun / DeepSpeed launcher / SLURM variables;
- `deepspeed_engine`: resolved ds_config, optimizer + parameter groups, LR schedule, `initialize`,
  checkpoints that become `latest` only when complete, RNG state capture;
- `trainer`: `Trainer.fit(resume=...)`, the loop for every task;
- `evaluator`: `evaluate(task, loaders, world)`, `gather_outputs` for tasks' `evaluate_end`;
- `logging`: TensorBoard + metrics.jsonl + log.txt of a run directory, progress (bars on terminals,
  step lines elsewhere);
- `run`: the `pretrain` / `finetune` / `evaluate` commands; `export`: checkpoint -> safetensors;
  `bench`: `bench train`; `universal`: universal checkpoints; `guard`: rank-failure handling.
"""
