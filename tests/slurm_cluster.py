"""A real one-node SLURM for tests: install (apt) if missing, start, submit, wait, stop.

Used by tests/test_slurm*.py. Everything is bounded in time and the daemons are stopped even when a
test fails; a machine where apt-get cannot install slurm-wlm + munge skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tools" / "slurm_local.sh"
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 90


@dataclass
class SlurmCluster:
    state_dir: Path
    env: dict

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sbatch(self, *args: str, env: Optional[dict] = None) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        if result.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job_field(self, job_id: int, field: str) -> Optional[str]:
        """A `scontrol show job` field (JobState, ExitCode, Restarts, ...); None once the job is forgotten."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        for item in result.stdout.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        return None

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> str:
        """Poll until the job reaches one of `states`; cancel it and fail the test on timeout."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(1)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s (cancelled)\n{self.logs()}")

    def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state_dir / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)


def _ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.name != "posix" or not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are not installed and there is no apt-get to install them")
    if os.geteuid() != 0:
        pytest.skip("slurm-wlm/munge are not installed and installing them with apt-get needs root")
    try:
        result = subprocess.run(["bash", str(HELPER), "install"], capture_output=True, text=True,
                                timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"apt-get install slurm-wlm munge took longer than {INSTALL_TIMEOUT_S}s")
    if result.returncode != 0:
        pytest.skip(f"apt-get could not install slurm-wlm + munge: {(result.stderr or result.stdout)[-800:]}")


def start_cluster(state_dir: Path) -> Iterator[SlurmCluster]:
    """Generator for a pytest fixture: yields a running cluster, always stops it afterwards."""
    _ensure_installed()
    state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SLURM_CONF=str(state_dir / "slurm.conf"), DS_ACCELERATOR="cpu",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # a job must not inherit the variables of a SLURM job that runs this test suite
    for key in [key for key in env if key.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if key != "SLURM_CONF":
            del env[key]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cluster = SlurmCluster(state_dir=state_dir, env=env)
    try:
        result = subprocess.run(["bash", str(HELPER), "start", str(state_dir)], capture_output=True, text=True,
                                timeout=START_TIMEOUT_S, env=env)
        if result.returncode != 0:
            raise AssertionError(f"tools/slurm_local.sh start failed:\n{result.stdout}\n{result.stderr}\n"
                                 f"{cluster.logs()}")
        yield cluster
    finally:
        subprocess.run(["bash", str(HELPER), "stop", str(state_dir)], capture_output=True, text=True,
                       timeout=120, env=env)
