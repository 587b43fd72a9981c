"""The launch scripts on a real one-node SLURM (slurmctld + slurmd on localhost, started by the tests).

Marker `slurm`; run by CI. Installs slurm-wlm + munge with apt-get when missing (skips with the reason
when that is impossible), and stops every daemon it started, whatever the outcome.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, start_cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    yield from start_cluster(tmp_path_factory.mktemp("slurm"))


PROBE = textwrap.dedent(
    """
    import os, socket, sys
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
    """
)


def _probe_job(tmp_path: Path, mode: str) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    script = tmp_path / "probe.sbatch"
    script.write_text(textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/probe-%j.out
        srun --kill-on-bad-exit=1 python3 {tmp_path}/probe.py {mode}
        """))
    return script


def test_srun_maps_rank_variables_and_all_reduce_works(slurm, tmp_path):
    job = slurm.sbatch(str(_probe_job(tmp_path, "ok")))
    state = slurm.wait(job, timeout=120)
    out = (tmp_path / f"probe-{job}.out").read_text()
    assert state == "COMPLETED", out
    lines = sorted(line for line in out.splitlines() if line.startswith("PROBE"))
    assert len(lines) == 2, out
    host = socket.gethostname().split(".")[0]
    for rank, line in enumerate(lines):
        assert f"rank={rank} local_rank={rank} world=2 sum=3" in line, line
        # first host of the allocation; a job-specific port
        assert f"master={host}:{20000 + job % 20000}" in line, line


def test_failing_rank_fails_the_job_with_its_error(slurm, tmp_path):
    job = slurm.sbatch(str(_probe_job(tmp_path, "fail")))
    state = slurm.wait(job, timeout=120)
    out = (tmp_path / f"probe-{job}.out").read_text()
    assert state == "FAILED", f"{state}\n{out}"
    assert slurm.job_field(job, "ExitCode") != "0:0"
    assert "[violet-ds rank 1/2" in out and "RuntimeError: probe failure on rank 1" in out, out


def test_make_hostfile_from_allocation(slurm, tmp_path):
    script = tmp_path / "hostfile.sbatch"
    script.write_text(textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --ntasks-per-node=2
        #SBATCH --time=2
        #SBATCH --output={tmp_path}/hostfile-%j.out
        bash {REPO}/launch/make_hostfile.sh {tmp_path}/hostfile
        """))
    job = slurm.sbatch(str(script))
    assert slurm.wait(job, timeout=60) == "COMPLETED", (tmp_path / f"hostfile-{job}.out").read_text()
    host = socket.gethostname().split(".")[0]
    assert (tmp_path / "hostfile").read_text().split("\n")[0] == f"{host} slots=2"
