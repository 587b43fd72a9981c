"""A two-rank probe script for the launcher tests (launch/local.sh, sbatch + srun): not a test module.

Each rank joins the process group, all-reduces its rank + 1 and prints one `PROBE ...` line; with the
argument `fail`, rank 1 raises so the tests can check how a launcher reports a failing rank.
"""

import os
import sys

import torch

from violet_ds.engine.distributed import init_distributed
from violet_ds.engine.guard import rank_guard

world = init_distributed(timeout_s=60, backend="gloo")
with rank_guard():
    value = torch.tensor([float(world.rank + 1)])
    torch.distributed.all_reduce(value)
    print(f"PROBE rank={world.rank} local_rank={world.local_rank} world={world.world_size} "
          f"sum={value.item():.0f} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    if sys.argv[-1] == "fail" and world.rank == 1:
        raise RuntimeError("probe failure on rank 1")
    torch.distributed.all_reduce(value)
