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

# every wait inside is bounded too; this is the backstop for a wedged daemon
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    yield from start_cluster(tmp_path_factory.mktemp("slurm"))


PROBE = Path(__file__).resolve().parent / "rank_probe.py"


def _probe_job(tmp_path: Path, mode: str) -> Path:
    script = tmp_path / "probe.sbatch"
    script.write_text(textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/probe-%j.out
        srun --kill-on-bad-exit=1 python3 {PROBE} {mode}
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


# ----------------------------------------------------------------------------------------- pretraining
# the demo recipe, made small: 2 ranks x batch 4, a few steps, no validation, no images
DEMO_ARGS = ["--config", str(REPO / "launch/configs/pretrain_demo.yaml"), "--data.batch_size", "4",
             "--data.val", "[]", "--run.progress", "false", "--run.log_every", "1", "--run.image_every", "0"]
SBATCH_OVERRIDES = ["--partition=debug", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                    "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def demo_work(tmp_path_factory) -> Path:
    import subprocess
    import sys

    if not (REPO / "launch/configs/pretrain_demo.yaml").is_file():
        pytest.skip("launch/configs/pretrain_demo.yaml is missing")
    work = tmp_path_factory.mktemp("slurm_work")
    result = subprocess.run([sys.executable, "-m", "violet_ds.cli", "make-demo-data", "--out", "data/demo",
                             "--num_videos", "40", "--num_images", "8", "--workers", "1"], cwd=work,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return work


def _submit_pretrain(slurm: SlurmCluster, work: Path, name: str, *args: str) -> int:
    return slurm.sbatch(*SBATCH_OVERRIDES, f"--output={work}/{name}-%j.out", f"--chdir={work}",
                        str(REPO / "launch/slurm_pretrain.sbatch"), *DEMO_ARGS, "--run.name", name, *args,
                        env={"VIOLET_DS_ROOT": str(REPO), "OMP_NUM_THREADS": "1"})


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pretrain_sbatch_two_ranks_zero2_checkpoint(slurm, demo_work):
    job = _submit_pretrain(slurm, demo_work, "slurm2", "--run.max_steps", "4")
    state = slurm.wait(job, timeout=300)
    log = (demo_work / f"slurm2-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-5000:]}"
    run_dir = demo_work / "runs/slurm2"
    assert f"run directory: {run_dir}" in log and "resolved configuration:" in log, log[-3000:]
    assert "world 2" in log and "ZeRO stage 2" in log, log[-3000:]
    assert "steps             4/4" in log, log[-3000:]
    tag = (run_dir / "checkpoints/latest").read_text().strip()
    marker = json.loads((run_dir / "checkpoints" / tag / "violet_ds_complete.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 4
    # ZeRO-2: each rank saved its own optimizer partition
    shards = sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2 and "zero_pp_rank_0_" in shards[0] and "zero_pp_rank_1_" in shards[1], shards
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert [r["step"] for r in _records(run_dir) if "loss" in r] == [1, 2, 3, 4]


def test_sigterm_checkpoints_requeues_and_resumes(slurm, demo_work):
    max_steps = 16
    # with the recipe's DataLoader worker: SLURM signals it too, and it must survive until the checkpoint
    # is written (violet_ds.engine.guard.ignore_preemption_signals as worker_init_fn)
    job = _submit_pretrain(slurm, demo_work, "preempt", "--run.max_steps", str(max_steps), "--data.num_workers", "1")
    run_dir = demo_work / "runs/preempt"
    slurm.wait_until(lambda: any("loss" in r for r in _records(run_dir)), timeout=240, what="the first step")
    slurm.run("scancel", "--signal=TERM", str(job))
    # the job saves, requeues itself, starts again after the credential lifetime and finishes
    slurm.wait_until(lambda: slurm.job_field(job, "Restarts") not in (None, "0"), timeout=120, what="the requeue")
    state = slurm.wait(job, timeout=300)
    log = (demo_work / f"preempt-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-6000:]}"
    saved = re.search(r"SIGTERM received: saved step (\d+) and stopping", log)
    assert saved, log[-6000:]
    stopped_at = int(saved.group(1))
    assert 0 < stopped_at < max_steps, log[-6000:]
    assert f"requeueing job {job}" in log, log[-6000:]
    assert re.search(rf"resumed from .*step{stopped_at:08d}: step {stopped_at}\b", log), log[-6000:]
    assert f"steps             {max_steps}/{max_steps}" in log, log[-6000:]
    steps = [r["step"] for r in _records(run_dir) if "loss" in r]
    # resumed where it stopped: every step once, in order
    assert steps == list(range(1, max_steps + 1)), steps


@pytest.mark.slow
def test_pretrain_sbatch_through_the_deepspeed_launcher(slurm, demo_work):
    """LAUNCHER=deepspeed: one srun task per node runs the DeepSpeed launcher over a generated hostfile."""
    job = slurm.sbatch(*SBATCH_OVERRIDES, f"--output={demo_work}/dslaunch-%j.out", f"--chdir={demo_work}",
                       str(REPO / "launch/slurm_pretrain.sbatch"), *DEMO_ARGS, "--run.name", "dslaunch",
                       "--run.max_steps", "2", env={"VIOLET_DS_ROOT": str(REPO), "OMP_NUM_THREADS": "1",
                                                    "LAUNCHER": "deepspeed"})
    state = slurm.wait(job, timeout=300)
    log = (demo_work / f"dslaunch-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-5000:]}"
    host = socket.gethostname().split(".")[0]
    assert "DeepSpeed launcher: hostfile" in log and "(1 node(s))" in log, log[-3000:]
    assert (demo_work / f"runs/dslaunch/hostfile-{job}").read_text().strip() == f"{host} slots=2"
    assert "num_local_procs=2" in log and "world 2" in log and "steps             2/2" in log, log[-3000:]
    tag = (demo_work / "runs/dslaunch/checkpoints/latest").read_text().strip()
    assert len(list((demo_work / "runs/dslaunch/checkpoints" / tag).glob("*zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_universal_resume_on_one_rank_through_sbatch(slurm, demo_work):
    """2 ranks -> universal checkpoint -> the same sbatch script on 1 rank continues the run."""
    import subprocess
    import sys

    job = _submit_pretrain(slurm, demo_work, "regrid", "--run.max_steps", "2", "--data.num_workers", "0")
    assert slurm.wait(job, timeout=300) == "COMPLETED", (demo_work / f"regrid-{job}.out").read_text()[-4000:]
    converted = subprocess.run([sys.executable, "-m", "violet_ds.cli", "universal-checkpoint", "--run_dir",
                                "runs/regrid", "--world_size", "1", "--batch_size", "8"], cwd=demo_work,
                               env=slurm.env, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    job = slurm.sbatch("--partition=debug", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                       "--cpus-per-task=1", "--time=15", f"--output={demo_work}/regrid1-%j.out",
                       f"--chdir={demo_work}", str(REPO / "launch/slurm_pretrain.sbatch"),
                       *DEMO_ARGS, "--data.batch_size", "8", "--run.name", "regrid", "--run.max_steps", "4",
                       "--data.num_workers", "0", env={"VIOLET_DS_ROOT": str(REPO), "OMP_NUM_THREADS": "1"})
    state = slurm.wait(job, timeout=300)
    log = (demo_work / f"regrid1-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-5000:]}"
    assert "world 1" in log, log[-4000:]
    assert "resumed from runs/regrid/checkpoints/step00000002-universal: step 2" in log, log[-4000:]
    assert "steps             4/4" in log, log[-4000:]
