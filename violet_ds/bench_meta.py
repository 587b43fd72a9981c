"""What every `violet-ds bench ...` JSON carries so results can be compared over time."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

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
