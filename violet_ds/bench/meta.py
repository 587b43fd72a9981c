"""What every `violet-ds bench ...` JSON carries so results can be compared over time, and the one writer of
those files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Union

import torch


def bench_meta() -> dict:
    """UTC time, host, versions, device and the git commit of the checkout (when it is one)."""
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "commit": commit}


def results_json(results: Any) -> str:
    """The text of a results file (and of `bench targets`' printout): indented JSON."""
    return json.dumps(results, indent=1)


def write_results(path: Union[str, Path], results: Any) -> Path:
    """Write `results` as JSON to `path` (folders made as needed); the file is replaced whole, so a benchmark
    that rewrites it after every section never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(results_json(results) + "\n")
    os.replace(partial, path)
    return path
