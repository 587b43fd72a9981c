"""`launch/slurm_extract.sbatch` as a SLURM array on a simulated cluster of 2 nodes (tests/cluster.py).

`sbatch --array=0-3` extracts 4 parts of one video list on both nodes; part 2 is cancelled while it writes
a shard, `check-parts` names it as not finished, part 2 resubmitted alone (`--array=2 --num_parts 4`)
resumes from its complete shards, and then `check-parts` finds every listed video in exactly one row.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster import REPO, SimCluster, base_env, start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VIDEOS = 400
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SimCluster:
    yield from start_cluster(tmp_path_factory.mktemp("sim_extract"), nodes=2, slurm=True)


def _listing(folder: Path) -> Path:
    """A list of VIDEOS ids over six tiny rendered clips (a few milliseconds each to extract)."""
    from violet_ds.data.demo import encode_mp4, render_clip

    clips = folder / "clips"
    clips.mkdir()
    paths = []
    for index, motion in enumerate(["left", "right", "up", "down", "still", "left"]):
        path = clips / f"clip{index}.mp4"
        encode_mp4(render_clip("blue", "square", "large", motion, 8, 32, np.random.default_rng(index)), path)
        paths.append(path)
    listing = folder / "videos.txt"
    listing.write_text("".join(f"vid{index:03d}\t{paths[index % len(paths)]}\n" for index in range(VIDEOS)))
    return listing


def _check_parts(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "violet_ds.cli", "check-parts", "--out_dir", str(out), "--prefix",
                           "video", *extra], env=base_env(), capture_output=True, text=True, timeout=120)


def test_array_job_on_two_nodes_with_a_killed_part_rerun(cluster, tmp_path):
    from violet_ds.data.tsv import TSVFile

    listing = _listing(tmp_path)
    out = tmp_path / "out"
    args = ["--videos", str(listing), "--out_dir", str(out), "--prefix", "video", "--num_frames", "2",
            "--short_side", "32", "--shard_size", "4", "--workers", "1"]
    options = ["--partition=debug", "--cpus-per-task=2", "--time=10", f"--output={tmp_path}/extract-%A_%a.out",
               f"--chdir={tmp_path}"]
    env = {"VIOLET_DS_ROOT": str(REPO), "VIOLET_DS_PYTHON": sys.executable}
    script = str(REPO / "launch/slurm_extract.sbatch")
    job = cluster.slurm.sbatch(*options, "--array=0-3", script, *args, env=env)

    # cancel part 2 once it has a complete shard and is writing the next one
    def writing() -> bool:
        return bool(list(out.glob("video_p002of004_*.tsv"))) and bool(list(out.glob("video_p002of004_*.tsv.tmp*")))

    cluster.slurm.wait_until(writing, timeout=JOB_TIMEOUT_S, what="part 2 writing its second shard")
    cluster.slurm.run("scancel", f"{job}_2")
    states = {part: cluster.slurm.wait(f"{job}_{part}", timeout=JOB_TIMEOUT_S) for part in range(4)}
    logs = {part: (tmp_path / f"extract-{job}_{part}.out").read_text() for part in range(4)}
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "CANCELLED", 3: "COMPLETED"}, (states, logs)
    hosts = {re.search(r"array task \d+ \(4 task\(s\) in the array\) on (\S+)", log).group(1) for log in logs.values()}
    assert hosts == {"node0", "node1"}, logs
    for part in (0, 1, 3):
        assert f"part {part}/4 (" in logs[part] and "0 failed" in logs[part], logs[part][-2000:]
    kept = {key for shard in out.glob("video_p002of004_*.tsv") for key in TSVFile(shard).keys()}
    assert kept and not (out / "video_p002of004_done.json").exists()

    result = _check_parts(out)
    assert result.returncode == 1 and "part 2/4 (video_p002of004) is incomplete" in result.stderr, result

    # part 2 resubmitted alone: the array no longer tells the number of parts, so it is given
    rerun = cluster.slurm.sbatch(*options, "--array=2", script, "--num_parts", "4", *args, env=env)
    assert cluster.slurm.wait(f"{rerun}_2", timeout=JOB_TIMEOUT_S) == "COMPLETED"
    log = (tmp_path / f"extract-{rerun}_2.out").read_text()
    assert f"skipped {len(kept)} already extracted" in log, log[-2000:]

    result = _check_parts(out, "--videos", str(listing))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"all 4 parts complete: {VIDEOS} videos" in result.stdout, result.stdout
    keys = [key for shard in sorted(out.glob("video_*.tsv")) for key in TSVFile(shard).keys()]
    assert sorted(keys) == [f"vid{index:03d}" for index in range(VIDEOS)]
    assert not list(out.glob("*.tmp*"))
