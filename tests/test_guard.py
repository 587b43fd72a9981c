"""A rank that raises ends a 2-process job with a non-zero exit and its traceback, within the timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from violet_ds.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]

# a job must be over well before this; the collective timeout inside is much shorter
JOB_LIMIT_S = 90

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from violet_ds.engine.distributed import init_distributed
    from violet_ds.engine.guard import rank_guard

    mode = sys.argv[1]
    world = init_distributed(timeout_s=int(os.environ["GUARD_TIMEOUT_S"]), backend="gloo")
    with rank_guard():
        value = torch.ones(1)
        torch.distributed.all_reduce(value)
        print(f"rank {world.rank} first all_reduce {value.item()}", flush=True)
        if world.rank == 1 and mode == "raise":
            raise ValueError("deliberate failure on rank 1")
        if world.rank == 1 and mode == "hang":
            time.sleep(600)
        # rank 0 blocks here waiting for rank 1
        torch.distributed.all_reduce(value)
        print(f"rank {world.rank} done {value.item()}", flush=True)
    """
)


def _launch(tmp_path: Path, mode: str, timeout_s: int = 20) -> tuple[list[subprocess.Popen], float]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", GUARD_TIMEOUT_S=str(timeout_s),
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs, time.monotonic()


def _wait(proc: subprocess.Popen, deadline: float) -> tuple[int | None, str]:
    try:
        out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


def test_raising_rank_ends_every_rank_nonzero(tmp_path):
    procs, start = _launch(tmp_path, "raise", timeout_s=60)
    deadline = start + JOB_LIMIT_S
    results = [_wait(proc, deadline) for proc in procs]
    elapsed = time.monotonic() - start
    (code0, out0), (code1, out1) = results
    assert code1 == 1, f"failing rank exit {code1}:\n{out1}"
    assert "[violet-ds rank 1/2" in out1 and "ValueError: deliberate failure on rank 1" in out1, out1
    assert "first all_reduce 2.0" in out0, out0
    # rank 0 was blocked in the second all_reduce; it must fail as soon as its peer is gone,
    # far earlier than the 60 s collective timeout
    assert code0 not in (None, 0), f"rank 0 exit {code0} (None = still hanging):\n{out0}"
    assert "[violet-ds rank 0/2" in out0, out0
    assert elapsed < 50, f"job took {elapsed:.0f}s: the peer waited for the collective timeout"


def test_hung_rank_is_ended_by_the_collective_timeout(tmp_path):
    procs, start = _launch(tmp_path, "hang", timeout_s=4)
    code0, out0 = _wait(procs[0], start + JOB_LIMIT_S)
    elapsed = time.monotonic() - start
    # the test plays the launcher: the first non-zero exit stops the rest
    procs[1].kill()
    procs[1].communicate()
    assert code0 not in (None, 0), f"rank 0 exit {code0} (None = still hanging):\n{out0}"
    assert "[violet-ds rank 0/2" in out0 and "FAILED" in out0, out0
    assert elapsed < 60, f"rank 0 needed {elapsed:.0f}s to notice a 4 s collective timeout"


def test_clean_run_exits_zero(tmp_path):
    procs, start = _launch(tmp_path, "ok")
    results = [_wait(proc, start + JOB_LIMIT_S) for proc in procs]
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exit {code}:\n{out}"
        assert f"rank {rank} done 4.0" in out


def test_single_process_reraises():
    from violet_ds.engine.guard import rank_guard

    with pytest.raises(RuntimeError, match="plain"):
        with rank_guard():
            raise RuntimeError("plain")


WORKER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from violet_ds.engine.guard import ignore_preemption_signals

    class Slow(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, index):
            time.sleep(0.05)
            return torch.tensor([index])

    stop = []
    signal.signal(signal.SIGTERM, lambda number, frame: stop.append(number))
    init = ignore_preemption_signals if sys.argv[1] == "ignore" else None
    loader = DataLoader(Slow(), batch_size=4, num_workers=1, worker_init_fn=init)
    seen = 0
    for batch in loader:
        seen += len(batch)
        if seen == 8:
            # what SLURM does on preemption: every process of the step gets SIGTERM
            os.killpg(os.getpgid(0), signal.SIGTERM)
        if stop and seen >= 24:
            break
    print(f"survived seen={seen} stop={bool(stop)}", flush=True)
    """
)


def _run_script(tmp_path, text: str, argument: str) -> subprocess.CompletedProcess:
    """Run a DataLoader script in its own process group (a group-wide signal reaches only its processes)."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, str(script), argument], env=env, capture_output=True, text=True,
                          timeout=JOB_LIMIT_S, start_new_session=True)


@pytest.mark.parametrize("mode", ["ignore", "default"])
def test_dataloader_workers_survive_a_step_wide_sigterm(tmp_path, mode):
    result = _run_script(tmp_path, WORKER_SCRIPT, mode)
    if mode == "ignore":
        assert result.returncode == 0 and "survived seen=24 stop=True" in result.stdout, result.stderr[-2000:]
    else:
        # the hazard the worker_init_fn exists for: PyTorch's worker dies and the step fails
        assert result.returncode != 0 and "DataLoader worker" in result.stderr, result.stdout + result.stderr[-2000:]


def test_single_rank_process_group_reraises_and_leaves_the_group(monkeypatch):
    import torch

    from violet_ds.engine.guard import rank_guard

    port = free_port()
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    with pytest.raises(KeyError, match="one rank"):
        with rank_guard():
            raise KeyError("one rank")
    assert not torch.distributed.is_initialized()


STARTUP_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch.utils.data import DataLoader
    from violet_ds.engine.guard import PreemptionSafeLoader, ignore_preemption_signals

    def term_before_init(worker_id):
        # the signal lands after the worker exists but before it could ignore it
        os.kill(os.getpid(), signal.SIGTERM)
        ignore_preemption_signals(worker_id)

    loader_class = PreemptionSafeLoader if sys.argv[1] == "safe" else DataLoader
    loader = loader_class(list(range(16)), batch_size=4, num_workers=1, worker_init_fn=term_before_init)
    seen = 0
    for epoch in range(2):  # every epoch starts a new worker
        seen += sum(len(batch) for batch in loader)
    blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print(f"survived seen={seen} parent_blocked={blocked}", flush=True)
    """
)


@pytest.mark.parametrize("loader", ["safe", "plain"])
def test_workers_survive_a_sigterm_while_they_start(tmp_path, loader):
    result = _run_script(tmp_path, STARTUP_SCRIPT, loader)
    if loader == "safe":
        assert result.returncode == 0 and "survived seen=32 parent_blocked=False" in result.stdout, \
            result.stderr[-2000:]
    else:
        # the race the SLURM SIGTERM test hit at an epoch boundary: the new worker dies
        assert result.returncode != 0 and "DataLoader worker" in result.stderr, result.stdout + result.stderr[-2000:]
