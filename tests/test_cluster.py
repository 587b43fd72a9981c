"""violet_ds across hosts, on a simulated cluster of 2 nodes on this machine (tests/cluster.py).

Each node has its own network namespace and address, hostname and /dev/shm; SLURM and sshd run inside the
nodes. The demo pretraining on 2 nodes x 2 ranks (CPU, gloo) through `slurm_pretrain.sbatch` (srun and
DeepSpeed-launcher modes) and through `launch/multinode.sh` (DeepSpeed launcher over ssh, pdsh) must give
per-step losses equal (1e-6) to 1 node x 4 ranks with the same global batch; losing one node's ranks
must end the job fast and non-zero with a resumable checkpoint; a universal checkpoint of the 2 x 2 run
resumes on 1 node x 2 ranks. The tests marked `slow` share one cluster; the others (a 2 x 1 env://
run, teardown after a failure) are in the default suite. docs/multinode.md#several-hosts-what-the-tests-ran
lists the commands, the checks and the measured times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import REPO, SimCluster, base_env, leftovers, loss_differences, sim_cluster, start_cluster, train_records

pytestmark = pytest.mark.timeout(900)

STEPS = 6
# the demo recipe with a global batch of 8 (4 ranks x 2 or 2 ranks x 4), checkpoints every 2 steps, all kept
DEMO_ARGS = ["--config", str(REPO / "launch/configs/pretrain_demo.yaml"), "--data.val", "[]",
             "--run.progress", "false", "--run.log_every", "1", "--run.image_every", "0",
             "--run.max_steps", str(STEPS), "--run.save_every", "2", "--run.keep_last", "5",
             "--data.num_workers", "0", "--run.log_sample_indices", "true"]
JOB_TIMEOUT_S = 300
LOST_RANK_DEADLINE_S = 60


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SimCluster:
    yield from start_cluster(tmp_path_factory.mktemp("sim"), nodes=2, slurm=True, ssh=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cluster_work")
    result = subprocess.run([sys.executable, "-m", "violet_ds.cli", "make-demo-data", "--out", "data/demo",
                             "--num_videos", "40", "--num_images", "8", "--workers", "1"], cwd=work,
                            env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return work


def _sbatch(cluster: SimCluster, work: Path, name: str, nodes: int, per_node: int, *args: str,
            options: tuple = (), env: dict | None = None, batch_size: int = 2) -> int:
    """slurm_pretrain.sbatch on `nodes` x `per_node` ranks; `options` go to sbatch, `args` to violet-ds pretrain."""
    return cluster.slurm.sbatch(
        "--partition=debug", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--gpus-per-node=0",
        "--cpus-per-task=1", "--time=15", f"--output={work}/{name}-%j.out", f"--chdir={work}", *options,
        str(REPO / "launch/slurm_pretrain.sbatch"), *DEMO_ARGS, "--data.batch_size", str(batch_size),
        "--run.name", name, *args, env={"VIOLET_DS_ROOT": str(REPO), **(env or {})})


def _finished(cluster: SimCluster, work: Path, name: str, job: int) -> str:
    state = cluster.slurm.wait(job, timeout=JOB_TIMEOUT_S)
    log = (work / f"{name}-{job}.out").read_text()
    assert state == "COMPLETED", f"{state}\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def reference(cluster, work) -> dict[int, dict]:
    """1 node x 4 ranks x batch 2, srun on node0: what every 2 x 2 run must equal."""
    job = _sbatch(cluster, work, "ref14", 1, 4, options=("--nodelist=node0",))
    log = _finished(cluster, work, "ref14", job)
    assert "world 4" in log, log[-3000:]
    records = train_records(work / "runs/ref14")
    assert sorted(records) == list(range(1, STEPS + 1)), sorted(records)
    return records


@pytest.fixture(scope="module")
def srun_2x2(cluster, work) -> tuple[Path, str]:
    """`sbatch -N 2 --ntasks-per-node 2 slurm_pretrain.sbatch` (srun mode): run directory and job log."""
    job = _sbatch(cluster, work, "srun22", 2, 2)
    return work / "runs/srun22", _finished(cluster, work, "srun22", job)


def _assert_on_both_nodes(cluster: SimCluster, log: str, ranks: dict[str, str]) -> None:
    """Every `who` (rank 2, node 1 launcher, ...) logged its network line on its node, through eth0."""
    for who, node in ranks.items():
        ip0 = cluster.node_ip(0)
        line = f"[violet-ds {who} on {node}] network: master node0 ({ip0}) reached through eth0; GLOO_SOCKET_IFNAME=eth0"
        assert line in log, (line, log[-4000:])


# ----------------------------------------------------------------------------------------- a. sbatch
@pytest.mark.slow
def test_sbatch_srun_two_nodes_equal_one_node(cluster, reference, srun_2x2):
    run_dir, log = srun_2x2
    assert "world 4" in log and "2 node(s) [node[0-1]], 4 task(s), launcher srun" in log, log[-4000:]
    _assert_on_both_nodes(cluster, log, {"rank 0": "node0", "rank 1": "node0", "rank 2": "node1",
                                         "rank 3": "node1"})
    # every log line of a rank names its host
    assert re.search(r"\[rank 0 on node0\] INFO step 6/6", log), log[-3000:]
    records = train_records(run_dir)
    assert loss_differences(records, reference, range(1, STEPS + 1)) == {}
    tag = (run_dir / "checkpoints/latest").read_text().strip()
    shards = sorted((run_dir / "checkpoints" / tag).glob("*zero_pp_rank_*_optim_states.pt"))
    assert tag == f"step{STEPS:08d}" and len(shards) == 4, (tag, shards)


@pytest.mark.slow
def test_sbatch_deepspeed_launcher_two_nodes_equal_one_node(cluster, work, reference):
    job = _sbatch(cluster, work, "ds22", 2, 2, env={"LAUNCHER": "deepspeed"})
    log = _finished(cluster, work, "ds22", job)
    assert (work / f"runs/ds22/hostfile-{job}").read_text().split("\n")[:2] == ["node0 slots=2", "node1 slots=2"]
    assert "(2 node(s))" in log and "num_local_procs=2" in log and "world 4" in log, log[-4000:]
    _assert_on_both_nodes(cluster, log, {"node 0 launcher": "node0", "node 1 launcher": "node1"})
    assert loss_differences(train_records(work / "runs/ds22"), reference, range(1, STEPS + 1)) == {}


# ----------------------------------------------------------------------------------------- b. ssh
@pytest.mark.slow
def test_deepspeed_launcher_over_ssh_two_hosts_equal_one_node(cluster, work, reference):
    """launch/multinode.sh on node0: DeepSpeed's pdsh runner starts node1's ranks through ssh."""
    if shutil.which("pdsh") is None:
        pytest.skip("pdsh (the DeepSpeed launcher's ssh backend) is not installed and apt-get could not install it")
    hostfile = work / "hostfile-ssh"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    env = base_env()
    env["PDSH_SSH_ARGS_APPEND"] = f"-F {cluster.ssh_config}"
    started = time.monotonic()
    result = cluster.run("node0", ["bash", str(REPO / "launch/multinode.sh"), "-H", str(hostfile), "-p", "29611",
                                   "pretrain", *DEMO_ARGS, "--data.batch_size", "2", "--run.name", "ssh22"],
                         env=env, cwd=work, timeout=JOB_TIMEOUT_S)
    out = result.stdout
    assert result.returncode == 0, out[-6000:]
    assert "2 host(s) from" in out and "master node0:29611, launcher pdsh" in out, out[-4000:]
    for rank, node in ((0, "node0"), (1, "node0"), (2, "node1"), (3, "node1")):
        assert f"[violet-ds rank {rank} on {node}] network: master node0 ({cluster.node_ip(0)}) reached through eth0" \
            in out, out[-4000:]
    assert "world 4" in out, out[-4000:]
    print(f"ssh 2x2 run: {time.monotonic() - started:.0f} s")
    assert loss_differences(train_records(work / "runs/ssh22"), reference, range(1, STEPS + 1)) == {}


# ----------------------------------------------------------------------------------------- c. lost node
def _rank_pids(cluster: SimCluster, node: str) -> list[int]:
    """The training processes (not srun_task.sh's shell) running on `node`."""
    return [pid for pid in cluster.processes(node, "-m violet_ds.cli pretrain")
            if "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")]


@pytest.mark.slow
def test_lost_node_ends_the_job_and_resume_continues_exactly(cluster, work, reference):
    job = _sbatch(cluster, work, "lost22", 2, 2)
    run_dir = work / "runs/lost22"
    cluster.slurm.wait_until(lambda: 3 in train_records(run_dir), timeout=JOB_TIMEOUT_S, what="step 3")
    killed = _rank_pids(cluster, "node1")
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert killed, "no rank found on node1"

    def every_rank_ended() -> bool:
        return not _rank_pids(cluster, "node0") and not _rank_pids(cluster, "node1") and \
            cluster.slurm.job_field(job, "JobState") in ("FAILED", "COMPLETED", "CANCELLED", "NODE_FAIL")

    cluster.slurm.wait_until(every_rank_ended, timeout=LOST_RANK_DEADLINE_S + 30, what="every rank to end")
    ended_s = time.monotonic() - killed_at
    log = (work / f"lost22-{job}.out").read_text()
    assert ended_s < LOST_RANK_DEADLINE_S, (ended_s, log[-4000:])
    print(f"lost node: every rank ended {ended_s:.1f} s after node1's ranks were killed")
    assert cluster.slurm.job_field(job, "JobState") == "FAILED", log[-4000:]
    assert cluster.slurm.job_field(job, "ExitCode") != "0:0"
    assert cluster.slurm.job_field(job, "Restarts") == "0", "a failure must not be requeued as a preemption"
    for rank in (2, 3):
        assert f"lost rank {rank} on host node1: exit status 137 (killed by signal 9)" in log, log[-4000:]
    assert "the job failed (not a preemption, not requeued)" in log, log[-4000:]
    # a surviving rank names the peer address it lost
    assert re.search(rf"\[violet-ds rank [01]/4 on node0 pid \d+\] RuntimeError: .*{re.escape(cluster.node_ip(1))}",
                     log), log[-4000:]

    # `latest` names a checkpoint every rank finished
    checkpoints = run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    marker = json.loads((checkpoints / tag / "violet_ds_complete.json").read_text())
    stopped_at = marker["step"]
    assert tag == f"step{stopped_at:08d}" and marker["world_size"] == 4 and 0 < stopped_at < STEPS, (tag, marker)
    assert len(list((checkpoints / tag).glob("*zero_pp_rank_*_optim_states.pt"))) == 4

    job = _sbatch(cluster, work, "lost22", 2, 2, "--run.resume", "auto")
    log = _finished(cluster, work, "lost22", job)
    assert re.search(rf"resumed from \S*{tag}: step {stopped_at}\b", log), log[-4000:]
    assert f"steps             {STEPS}/{STEPS}" in log, log[-3000:]
    assert loss_differences(train_records(run_dir), reference, range(1, STEPS + 1)) == {}


# ----------------------------------------------------------------------------------------- d. universal
@pytest.mark.slow
def test_universal_checkpoint_of_two_nodes_resumes_on_one_node(cluster, work, reference, srun_2x2):
    """The 2 x 2 run's step-2 checkpoint, made universal, continues on 1 node x 2 ranks x batch 4."""
    run_dir = work / "runs/uni12"
    shutil.copytree(srun_2x2[0], run_dir)
    (run_dir / "run.lock").unlink(missing_ok=True)
    (run_dir / "metrics.jsonl").write_text("")  # only the continued steps
    for later in range(4, STEPS + 1, 2):
        shutil.rmtree(run_dir / f"checkpoints/step{later:08d}")
    (run_dir / "checkpoints/latest").write_text("step00000002")
    converted = subprocess.run([sys.executable, "-m", "violet_ds.cli", "universal-checkpoint", "--run_dir",
                                str(run_dir), "--world_size", "2", "--batch_size", "4"], cwd=work, env=base_env(),
                               capture_output=True, text=True, timeout=300)
    out = converted.stdout + converted.stderr
    assert converted.returncode == 0, out[-4000:]
    assert (run_dir / "checkpoints/latest").read_text() == "step00000002-universal"
    job = _sbatch(cluster, work, "uni12", 1, 2, batch_size=4)
    log = _finished(cluster, work, "uni12", job)
    assert "world 2" in log, log[-4000:]
    assert re.search(r"resumed from \S*step00000002-universal: step 2\b", log), log[-4000:]
    assert "is not an exact continuation" in log, log[-4000:]
    continued = train_records(run_dir)
    assert sorted(continued) == list(range(3, STEPS + 1)), sorted(continued)
    # the tolerance of docs/multinode.md#resuming-on-a-different-number-of-gpus: the same samples in the
    # same steps; the masked-visual-modeling loss, which depends only on the weights and the samples, within
    # a quarter of what the reference learned; MLM and VTM draw from per-rank RNG streams and are only finite
    for step in range(3, STEPS + 1):
        assert continued[step]["indices"][0::2] == reference[step]["indices"], step
    progress = reference[1]["loss_mvm"] - sum(reference[s]["loss_mvm"] for s in range(3, STEPS + 1)) / (STEPS - 2)
    losses = {s: (round(continued[s]["loss_mvm"], 4), round(reference[s]["loss_mvm"], 4)) for s in continued}
    assert progress > 0.03, f"the reference did not learn: {losses}"
    for step in range(3, STEPS + 1):
        assert abs(continued[step]["loss_mvm"] - reference[step]["loss_mvm"]) < 0.25 * progress, losses
        assert all(abs(continued[step][k]) < 1e6 for k in ("loss_mlm", "loss_vtm")), continued[step]


# ----------------------------------------------------------------------------------------- teardown
@pytest.mark.slow
def test_zz_teardown_leaves_nothing(cluster):
    """Runs last in this module: stops the shared cluster itself (the fixture's own teardown is then a no-op)."""
    down = cluster.down()
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftovers(cluster) == []


# ----------------------------------------------------------------------------------------- default suite
def test_two_hosts_one_rank_each_env_rendezvous(tmp_path, demo):
    """The fast variant: 2 nodes x 1 rank, env:// rendezvous at node0, 2 steps, through launch/rank.sh."""
    from engine_support import tiny_config, write_config

    started = time.monotonic()
    config = write_config(tiny_config(demo, tmp_path / "runs", "env2", run__max_steps=2), tmp_path / "env2.yaml")
    with sim_cluster(tmp_path / "sim", nodes=2) as sim:
        ranks = []
        for rank in range(2):
            env = base_env()
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="node0", MASTER_PORT="29555")
            ranks.append(sim.popen(f"node{rank}", ["bash", str(REPO / "launch/rank.sh"), "pretrain", "--config",
                                                   str(config)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True))
        outputs = []
        try:
            for process in ranks:
                outputs.append(process.communicate(timeout=120)[0])
        finally:
            for process in ranks:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
        for rank, (process, out) in enumerate(zip(ranks, outputs)):
            assert process.returncode == 0, (rank, out[-4000:])
            assert (f"[violet-ds rank {rank} on node{rank}] network: master node0 ({sim.node_ip(0)}) reached through "
                    f"eth0; GLOO_SOCKET_IFNAME=eth0") in out, out[-3000:]
        assert "world 2" in outputs[0] and re.search(r"\[rank 0 on node0\] INFO step 2/2", outputs[0]), outputs[0][-3000:]
    assert leftovers(sim) == []
    run_dir = tmp_path / "runs/env2"
    assert sorted(train_records(run_dir)) == [1, 2]
    marker = json.loads((run_dir / "checkpoints/step00000002/violet_ds_complete.json").read_text())
    assert marker["world_size"] == 2
    print(f"2 x 1 env:// run on the simulated cluster: {time.monotonic() - started:.0f} s")


def test_teardown_after_a_failure_leaves_nothing(tmp_path):
    """A failing body still tears the cluster down: processes inside the nodes, namespaces, /dev/shm."""
    with pytest.raises(RuntimeError, match="inside the cluster"):
        with sim_cluster(tmp_path / "sim", nodes=2) as sim:
            assert sim.run("node1", ["hostname"]).stdout.strip() == "node1"
            # each node has its own /dev/shm
            assert sim.run("node0", ["sh", "-c", "echo x > /dev/shm/violet-sim-probe && ls /dev/shm"]).stdout.split() \
                == ["violet-sim-probe"]
            assert not Path("/dev/shm/violet-sim-probe").exists()
            assert sim.run("node1", ["ls", "/dev/shm"]).stdout.split() == []
            # the nodes reach each other by name
            assert sim.run("node1", ["getent", "hosts", "node0"]).stdout.split()[0] == sim.node_ip(0)
            sim.popen("node1", ["sleep", "600"], start_new_session=True)
            deadline = time.monotonic() + 30
            while not sim.processes("node1", "sleep 600"):  # nsenter joins the node, then becomes sleep
                assert time.monotonic() < deadline, "sleep 600 did not start on node1"
                time.sleep(0.1)
            raise RuntimeError("a test failed inside the cluster")
    assert leftovers(sim) == []
