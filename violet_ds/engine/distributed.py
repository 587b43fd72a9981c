"""Process-group setup from whichever launcher started us: torchrun, the DeepSpeed launcher or SLURM.

All mapping of launcher variables to RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
happens here, once; everything else reads the returned `World`.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a single-host MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # a single plain host name needs no expansion
        return nodelist.split(",")[0]


def slurm_master() -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) of this SLURM job: its first host and a port derived from the job id.

    Variables already in the environment win. The port is job-specific so that two jobs sharing a
    node do not collide; every task and the DeepSpeed-launcher path of the sbatch scripts
    (`python -m violet_ds.engine.distributed master`) get the same answer.
    """
    addr = os.environ.get("MASTER_ADDR") or _first_slurm_host()
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    port = os.environ.get("MASTER_PORT") or str(20000 + job % 20000)
    return addr, port


def in_slurm_step() -> bool:
    """True inside an `srun` task (not in the batch script itself, which has SLURM_PROCID=0 too)."""
    return "SLURM_PROCID" in os.environ and ("SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ)


def env_from_slurm() -> None:
    """Fill the torch.distributed variables from SLURM's when the process is an `srun` task.

    Variables that a launcher already set (torchrun / deepspeed inside an allocation) win. The batch
    script itself (SLURM_PROCID=0 but no job step) is not a rank: mapping it would make a command
    run there wait forever for peers that were never started.
    """
    if not in_slurm_step() or "RANK" in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    # the step's task count: a step may use fewer tasks than the allocation (`srun -n1 ...`)
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", _tasks_on_this_node())
    addr, port = slurm_master()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port


def _default_master(port: str) -> None:
    """MASTER_ADDR / MASTER_PORT where no launcher set them: this host, at `port`."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)


def env_single_process() -> None:
    """A process that no launcher started (no WORLD_SIZE, not an `srun` task) becomes rank 0 of a 1-rank world
    with this host as master at a free port (DeepSpeed needs a process group even then)."""
    if "WORLD_SIZE" in os.environ or in_slurm_step():
        return
    _default_master(str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def _tasks_on_this_node() -> str:
    """SLURM writes tasks per node as `2(x3),1`; this node's count is the entry covering SLURM_NODEID."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or "1"
    node = int(os.environ.get("SLURM_NODEID", "0") or 0)
    seen = 0
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        seen += int(repeat.rstrip(")")) if repeat else 1
        if node < seen:
            return count
    return spec.split(",")[0].partition("(")[0]


def cpu_allreduce_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU comm op creates for `rank` when every rank is on one machine
    (`LOCAL_SIZE` == world size, as the DeepSpeed launcher sets): 66 MB in /dev/shm, named by user, master
    address and port."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _release_cpu_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's CPU all-reduce segment once every rank has mapped every other's (DeepSpeed maps them all
    while it initialises and never unlinks them: each 2-rank CPU run left 132 MB in /dev/shm, 16 GB over a day
    of test runs here, until the machine ran out of memory). The mappings stay valid until the processes exit."""
    torch.distributed.barrier()  # every rank is past DeepSpeed's initialisation, which opens the others' segments
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)


def init_distributed(timeout_s: int = 1800, backend: str = "auto") -> World:
    """Initialise torch.distributed (through DeepSpeed's comm layer) if launched with several ranks.

    Returns a single-process `World` when no launcher variables are present. Idempotent.
    """
    env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 or "MASTER_ADDR" in os.environ:
        _default_master("29500")
        from .logging import library_output  # engine.logging imports this module: a top-level import would be circular

        # DeepSpeed's import (deferred to here: single-process tools never pay for it) and its communication op build print to stdout: into the run's log instead
        with library_output("deepspeed"):
            import deepspeed

            if not torch.distributed.is_initialized():
                deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                           verbose=False)
            if not cuda and int(os.environ.get("LOCAL_SIZE", "0")) == world_size:
                _release_cpu_allreduce_buffer(rank)
    return World(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend, device=device)


def _main(argv: list[str]) -> int:
    """`python -m violet_ds.engine.distributed master`: print MASTER_ADDR and MASTER_PORT (sbatch scripts)."""
    if argv[:1] != ["master"]:
        print("usage: python -m violet_ds.engine.distributed master", file=sys.stderr)
        return 2
    print(*slurm_master())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
