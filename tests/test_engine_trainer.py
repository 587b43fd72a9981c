"""engine/trainer.py: the loop. A run killed (SIGKILL) or preempted (SIGTERM) after a checkpoint continues with
bitwise the same losses, learning rates and samples as an uninterrupted run (CPU, bf16, ZeRO-2); on several
ranks the stop flag costs no host sync outside the logging window."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from violet_ds.config import RunConfig
from violet_ds.engine.distributed import World, free_port
from violet_ds.engine.logging import RunLogger
from violet_ds.engine.trainer import Trainer
from violet_ds.tasks.base import Task

from engine_support import (cli_command, cli_env, latest_tag, run_cli, tiny_config,
                            train_records, write_config, REPO)

MAX_STEPS = 12


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> list[dict]:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("resume_runs")
    config = write_config(tiny_config(demo, out, "reference", run__max_steps=MAX_STEPS), out / "reference.yaml")
    run_cli(config)
    records = train_records(out / "reference")
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    return records


def _interrupt(config: Path, run_dir: Path, sig: int, after_tag: str, extra: tuple = (),
               timeout: float = 240) -> subprocess.Popen:
    """Start a run, wait until `latest` names `after_tag` (or later), then send `sig`."""
    process = subprocess.Popen(cli_command(config, *extra), env=cli_env(), cwd=str(REPO), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        tag = latest_tag(run_dir)
        if tag is not None and tag >= after_tag:
            process.send_signal(sig)
            break
        if process.poll() is not None:
            break
        time.sleep(0.02)
    output, _ = process.communicate(timeout=timeout)
    process.output = output
    return process


def _assert_continues_exactly(reference: list[dict], resumed: list[dict], resumed_from: int) -> None:
    assert [r["step"] for r in resumed] == list(range(1, MAX_STEPS + 1))
    for ref, got in zip(reference, resumed):
        assert got["indices"] == ref["indices"], f"step {ref['step']}: other samples than the uninterrupted run"
        # bitwise: floats written by json round-trip exactly
        for key in ("loss", "loss_vtm", "loss_mlm", "loss_mvm", "lr"):
            assert got[key] == ref[key], f"step {ref['step']} {key}: {got[key]!r} != {ref[key]!r}"
    epochs = sorted({r["epoch"] for r in resumed})
    # the run crosses an epoch boundary; within an epoch no sample repeats
    assert len(epochs) == 2
    for epoch in epochs:
        seen = [i for r in resumed if r["epoch"] == epoch for i in r["indices"]]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a sample was repeated"
    assert resumed_from < MAX_STEPS


def test_sigkill_then_sigterm_then_resume_matches_uninterrupted(demo, reference, tmp_path):
    """One run interrupted twice: SIGKILL after its first checkpoint, resumed with `auto`; then SIGTERM
    (preemption: it saves and exits 0), resumed with `latest`; the end result equals the reference."""
    config = write_config(tiny_config(demo, tmp_path, "interrupted", run__max_steps=MAX_STEPS), tmp_path / "run.yaml")
    run_dir = tmp_path / "interrupted"

    killed = _interrupt(config, run_dir, signal.SIGKILL, after_tag="step00000002")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{killed.output[-2000:]}"
    killed_at = int(latest_tag(run_dir).replace("step", ""))
    assert killed_at < MAX_STEPS

    # resume after the kill, and preempt the resumed run once it saved a later checkpoint
    resumed = _interrupt(config, run_dir, signal.SIGTERM, after_tag=f"step{killed_at + 2:08d}",
                         extra=("--run.resume", "auto"))
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step{killed_at:08d}'}" in (run_dir / "log.txt").read_text()
    assert "SIGTERM received" in resumed.output, resumed.output[-3000:]
    stopped_at = int(latest_tag(run_dir).replace("step", ""))
    assert killed_at < stopped_at < MAX_STEPS, (killed_at, stopped_at)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] is True and summary["steps"] == stopped_at and summary["end"] == "preempted"

    run_cli(config, "--run.resume", "latest")
    _assert_continues_exactly(reference, train_records(run_dir), stopped_at)


# ----------------------------------------------------------------------------------------- host syncs per step
class _Counting(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (item / float / bool: aten._local_scalar_dense)."""

    def __init__(self, counts: dict):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["item"] += 1
        return func(*args, **(kwargs or {}))


class _Scorer(Task):
    def build(self):
        self.heads["score"] = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return {"loss": self.heads["score"](batch["x"]).pow(2).mean()}


class _Engine:
    """The slice of a DeepSpeed engine the trainer uses; notes the host syncs so far at every optimizer step."""

    def __init__(self, module: torch.nn.Module, counts: dict):
        self.module, self.counts, self.skipped_steps, self.monitor = module, counts, 0, None
        self.nonfinite_skip = None
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
        self.at_step: list[dict] = []

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss):
        loss.backward()

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.at_step.append(dict(self.counts))

    def get_global_grad_norm(self):
        return None

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)


def _count_syncs(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    counts = {"item": 0, "collective": 0}
    all_reduce = dist.all_reduce

    def counted_all_reduce(*args, **kwargs):
        counts["collective"] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted_all_reduce
    world = World(rank=rank, world_size=2, local_rank=rank)
    run_dir = Path(out) / "run"
    engine = _Engine(_Scorer(torch.nn.Identity(), None), counts)
    trainer = Trainer(engine=engine, scheduler=None, world=world, run_dir=run_dir, logger=RunLogger(run_dir, world),
                      make_loader=lambda cursor: [{"x": torch.randn(2, 4)} for _ in range(200 - cursor.micro_in_epoch)],
                      micro_per_epoch=200, batch_size=2, grad_accum=1, total_steps=80,
                      run=RunConfig(max_steps=80, log_every=4, image_every=0, progress=False))
    with _Counting(counts):
        trainer.fit()
    # after optimizer step s (1-based) until step s + 1: the tail of step s (windows close at steps 4, 8, ...)
    tails = [{key: later[key] - earlier[key] for key in counts} for earlier, later in
             zip(engine.at_step, engine.at_step[1:])]
    Path(out, f"rank{rank}.json").write_text(json.dumps(tails))
    dist.destroy_process_group()


def test_two_ranks_sync_only_at_the_logging_window(tmp_path):
    """The stop flag (Ctrl-C / SIGTERM on any rank) rides in the logging window's all-reduce: a step outside a window
    reads nothing back from the device and makes no collective; a window makes two (loss means with the stop flag,
    the divergence flags)."""
    mp.spawn(_count_syncs, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        tails = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(tails) == 79
        for step, tail in enumerate(tails, start=1):
            expected = {"item": 0, "collective": 2} if step % 4 == 0 else {"item": 0, "collective": 0}
            assert tail == expected, (rank, step, tail)
