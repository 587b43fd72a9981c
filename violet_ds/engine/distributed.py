"""Process-group setup from whichever launcher started us: torchrun, the DeepSpeed launcher or SLURM.

All mapping of launcher variables to RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
happens here, once; everything else reads the returned `World`.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

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


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # a single plain host name needs no expansion
        return nodelist.split(",")[0]


def env_from_slurm() -> None:
    """Fill the torch.distributed variables from SLURM's when the process is an `srun` task.

    Variables that a launcher already set (torchrun / deepspeed inside an allocation) win.
    """
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    # a job-specific port so two jobs sharing a node do not collide
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))


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
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        import deepspeed

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                       verbose=False)
    return World(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend, device=device)
