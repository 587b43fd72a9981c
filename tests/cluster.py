"""A simulated multi-node cluster for tests: N nodes on this machine, through tools/sim_cluster.sh.

Each node is a network namespace with its own address (a veth pair on a bridge), its own hostname (UTS
namespace) and its own /dev/shm and /etc/hosts (mount namespace); the filesystem is shared. Optionally
SLURM (slurmctld on node0, one `slurmd -N nodeK` inside every node, munged shared) and an sshd in every
node that accepts a key made for the cluster (`ssh -F <dir>/ssh/config`, host key checking off).

`sim_cluster(...)` is a context manager and `start_cluster(...)` a fixture generator: the cluster is torn
down (every process inside the nodes ended, namespaces, veth pairs and bridge deleted) whatever happens in
between, and `leftovers(cluster)` lists anything that survived. Needs root, `ip netns`, unshare and
nsenter; `skip_reason()` says what is missing, and the fixtures skip with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "sim_cluster.sh"
UP_TIMEOUT_S = 600          # includes apt-get install of missing packages
DOWN_TIMEOUT_S = 120
# variables a launcher sets for the test process itself; a job or rank started here must not inherit them
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def skip_reason(slurm: bool = False, ssh: bool = False) -> Optional[str]:
    """Why a simulated cluster cannot start here (None when it can); missing packages are installed by `up`,
    so only what apt-get cannot fix counts."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and mounts)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces (unshare --net --uts --mount): {probe.stderr.strip()}"
    missing = [tool for tool, wanted in (("slurmctld", slurm), ("munged", slurm), ("sshd", ssh))
               if wanted and shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and there is no apt-get to install them"
    return None


def base_env() -> dict:
    """This process's environment for a job or rank: CPU DeepSpeed, one thread, no launcher variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    for key in LAUNCHER_VARS:
        env.pop(key, None)
    for key in [key for key in env if key.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        del env[key]
    return env


class _Slurm(SlurmCluster):
    def logs(self, lines: int = 30) -> str:
        out = []
        for path in sorted((self.state_dir / "slurm").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)


@dataclass
class SimCluster:
    dir: Path
    nodes: int
    slurm: Optional[SlurmCluster] = None
    ssh_config: Optional[Path] = None
    state: dict = field(default_factory=dict)

    def node_ip(self, k: int) -> str:
        return self.state[f"NODE_{k}_IP"]

    def holder(self, node: str) -> int:
        return int(self.state[f"NODE_{node.removeprefix('node')}_PID"])

    def popen(self, node: str, argv: list[str], *, env: Optional[dict] = None, cwd: Optional[Path] = None,
              **kwargs) -> subprocess.Popen:
        prefix = ["nsenter", "-t", str(self.holder(node)), "-n", "-u", "-m", f"--wd={cwd or os.getcwd()}", "--"]
        return subprocess.Popen(prefix + list(argv), env=env if env is not None else base_env(), **kwargs)

    def run(self, node: str, argv: list[str], *, env: Optional[dict] = None, cwd: Optional[Path] = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        process = self.popen(node, argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            raise AssertionError(f"{' '.join(argv)} on {node} ran past {timeout:.0f}s:\n{out[-4000:]}")
        return subprocess.CompletedProcess(argv, process.returncode, out, "")

    def uts(self, node: str) -> str:
        return self.state[f"NODE_{node.removeprefix('node')}_UTS"]

    def processes(self, node: str, pattern: str = "") -> list[int]:
        """Processes running inside `node` whose command line contains `pattern`."""
        uts = self.uts(node)
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.readlink(proc / "ns" / "uts") != uts:
                    continue
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmdline:
                found.append(int(proc.name))
        return found

    def kill(self, node: str, pattern: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to the processes of `node` whose command line contains `pattern`; their pids."""
        pids = self.processes(node, pattern)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def down(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(TOOL), "down", str(self.dir)], capture_output=True, text=True,
                              timeout=DOWN_TIMEOUT_S)


def _read_state(path: Path) -> dict:
    state = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key:
            state[key] = value
    return state


@contextlib.contextmanager
def sim_cluster(directory: Path, nodes: int = 2, slurm: bool = False, ssh: bool = False) -> Iterator[SimCluster]:
    """A running simulated cluster; torn down on the way out, also when the body or the start fails."""
    reason = skip_reason(slurm, ssh)
    if reason:
        pytest.skip(f"simulated cluster: {reason}")
    directory.mkdir(parents=True, exist_ok=True)
    flags = [str(nodes)] + (["--slurm"] if slurm else []) + (["--ssh"] if ssh else [])
    cluster = SimCluster(dir=directory, nodes=nodes)
    try:
        result = subprocess.run(["bash", str(TOOL), "up", str(directory), *flags], capture_output=True, text=True,
                                timeout=UP_TIMEOUT_S, env=base_env())
        if result.returncode != 0:
            raise AssertionError(f"tools/sim_cluster.sh up failed:\n{result.stdout}\n{result.stderr}")
        cluster.state = _read_state(directory / "cluster.env")
        if slurm:
            env = base_env()
            env["SLURM_CONF"] = str(directory / "slurm.conf")
            cluster.slurm = _Slurm(state_dir=directory, env=env)
        if ssh:
            cluster.ssh_config = directory / "ssh" / "config"
        yield cluster
    finally:
        down = cluster.down()
        if down.returncode != 0:
            print(f"tools/sim_cluster.sh down {directory} exited {down.returncode}:\n{down.stdout}\n{down.stderr}")


def start_cluster(directory: Path, nodes: int = 2, slurm: bool = False, ssh: bool = False) -> Iterator[SimCluster]:
    """Generator for a pytest fixture (`yield from start_cluster(...)`)."""
    with sim_cluster(directory, nodes, slurm, ssh) as cluster:
        yield cluster


def leftovers(cluster: SimCluster, wait_s: float = 10.0) -> list[str]:
    """What a torn-down cluster left behind: namespaces, links, processes, mounts, /dev/shm segments, pid files.
    The kernel removes a deleted namespace's veth pair asynchronously: what is left is looked at again for up to
    `wait_s` seconds before it counts."""
    deadline = time.monotonic() + wait_s
    while True:
        left = _leftovers_now(cluster)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _leftovers_now(cluster: SimCluster) -> list[str]:
    left = []
    state = cluster.state
    prefix = state.get("PREFIX")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    if prefix:
        left += [f"network namespace {line.split()[0]}" for line in names.splitlines() if line.startswith(prefix + "-")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
        left += [f"link {m.group(1)}" for m in re.finditer(rf"^\d+: ({re.escape(prefix)}[^:@ ]*)", links, re.M)]
    uts = {state[key] for key in state if key.endswith("_UTS")}
    marker = str(cluster.dir)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            in_node = os.readlink(proc / "ns" / "uts") in uts
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if in_node or marker in cmdline:
            left.append(f"process {proc.name}: {cmdline[:200]}")
    mounts = Path("/proc/self/mountinfo").read_text()
    left += [f"mount {line.split()[4]}" for line in mounts.splitlines()
             if marker in line or "vds-shm-" in line or (prefix and f"/run/netns/{prefix}-" in line)]
    if state.get("NETNS_MOUNT_NEW") == "1" and not names.strip() and " /run/netns " in mounts:
        left.append("mount /run/netns")
    if state.get("CREATED_RUN_SSHD") == "1" and Path("/run/sshd").exists():
        left.append("directory /run/sshd")
    left += [f"pid file {path}" for path in cluster.dir.glob("**/*.pid")]
    return left


# ----------------------------------------------------------------------------------------- run records
def train_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl training records by step; a step logged twice (a run killed after it and resumed
    before it) keeps its last record."""
    path = run_dir / "metrics.jsonl"
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "loss" in record and record.get("split") is None:
                    records[record["step"]] = record
    return records


def loss_differences(run: dict[int, dict], reference: dict[int, dict], steps) -> dict:
    """{step: {key: (run, reference)}} of every loss that differs by more than 1e-6 (missing steps too)."""
    wrong = {}
    for step in steps:
        if step not in run or step not in reference:
            wrong[step] = "missing"
            continue
        keys = sorted(k for k in reference[step] if k == "loss" or k.startswith("loss_"))
        diff = {k: (run[step].get(k), reference[step][k]) for k in keys
                if run[step].get(k) is None or abs(run[step][k] - reference[step][k]) > 1e-6}
        if diff:
            wrong[step] = diff
    return wrong
