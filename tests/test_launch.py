"""launch/local.sh through the real DeepSpeed launcher, and the launcher-variable mapping of the engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from violet_ds.engine import distributed

REPO = Path(__file__).resolve().parents[1]

PROBE = Path(__file__).resolve().parent / "rank_probe.py"


def _local(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(["bash", str(REPO / "launch/local.sh"), "-n", "2", "--script", str(PROBE), mode],
                          env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.distributed
def test_local_sh_starts_two_ranks(tmp_path):
    result = _local(tmp_path, "ok")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for rank in range(2):
        assert f"PROBE rank={rank} local_rank={rank} world=2 sum=3" in out, out[-3000:]


@pytest.mark.distributed
def test_local_sh_one_failing_rank_fails_the_launch(tmp_path):
    result = _local(tmp_path, "fail")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "[violet-ds rank 1/2" in out and "RuntimeError: probe failure on rank 1" in out, out[-3000:]


def test_local_sh_usage_without_command():
    result = subprocess.run(["bash", str(REPO / "launch/local.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "launch/local.sh" in result.stderr


# ----------------------------------------------------------------------------------------- env mapping
def set_env(monkeypatch, **values: str) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def clean_env(monkeypatch):
    # the code under test writes these variables itself: register each with monkeypatch first so the
    # values it writes are undone too (a leaked WORLD_SIZE=8 would make later in-process runs multi-rank)
    torch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in [k for k in os.environ if k.startswith("SLURM_")] + list(torch_vars):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    return monkeypatch


def test_srun_task_variables_map_to_torch_distributed(clean_env):
    set_env(clean_env,
            SLURM_PROCID="5", SLURM_STEP_ID="0", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="1",
            SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_JOB_ID="123456", SLURM_STEP_NODELIST="gpu017")
    distributed.env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"
    assert os.environ["MASTER_ADDR"] == "gpu017"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_batch_shell_is_not_a_rank(clean_env):
    # inside the batch script SLURM_PROCID=0 and SLURM_NTASKS=8 are set, but no step runs yet
    set_env(clean_env, SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_JOB_ID="7")
    distributed.env_from_slurm()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_launcher_variables_win_over_slurm(clean_env):
    # the DeepSpeed launcher (or torchrun) inside an allocation already set the rank variables
    set_env(clean_env, SLURM_PROCID="0", SLURM_STEP_ID="0", SLURM_NTASKS="1", RANK="3", WORLD_SIZE="4")
    distributed.env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


@pytest.mark.parametrize("spec,node,expected", [("2(x3),1", 0, "2"), ("2(x3),1", 2, "2"), ("2(x3),1", 3, "1"),
                                                ("8", 0, "8"), ("4,2", 1, "2")])
def test_tasks_per_node_spec(clean_env, spec, node, expected):
    clean_env.setenv("SLURM_TASKS_PER_NODE", spec)
    clean_env.setenv("SLURM_NODEID", str(node))
    assert distributed._tasks_on_this_node() == expected


def test_master_command_prints_address_and_port(clean_env):
    env = dict(os.environ, SLURM_JOB_ID="41", MASTER_ADDR="node-a",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-m", "violet_ds.engine.distributed", "master"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["node-a", str(20000 + 41)]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) is not installed")
def test_make_hostfile_expands_the_nodelist(tmp_path):
    # scontrol reads a configuration even to expand host names; a minimal one, no controller needed
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\nNodeName=gpu[001-003] CPUs=1\n"
                    "PartitionName=test Nodes=ALL\n")
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu[001-003]", SLURM_NTASKS_PER_NODE="4", SLURM_CONF=str(conf))
    env.pop("SLURM_GPUS_ON_NODE", None)
    result = subprocess.run(["bash", str(REPO / "launch/make_hostfile.sh"), str(tmp_path / "hostfile")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hostfile").read_text().split("\n")[:3] == ["gpu001 slots=4", "gpu002 slots=4",
                                                                   "gpu003 slots=4"]


def test_sbatch_scripts_are_valid_and_differ_only_in_the_command():
    scripts = {name: (REPO / "launch" / f"slurm_{name}.sbatch").read_text() for name in ("pretrain", "finetune")}
    for name, text in scripts.items():
        result = subprocess.run(["bash", "-n", str(REPO / "launch" / f"slurm_{name}.sbatch")], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        # the defaults a user overrides, and what makes preemption resumable
        for option in ("--partition=", "--nodes=", "--gpus-per-node=", "--ntasks-per-node=", "--time=",
                       "--requeue", "--signal=TERM@"):
            assert any(option in line for line in directives), (name, option)
        assert f"violet_ds_slurm_run {name} \"$@\"" in text
    for script in ("slurm_common.sh", "srun_task.sh", "make_hostfile.sh", "local.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, (script, result.stderr)
