"""`engine.keep_host_memory`: a CPU run's malloc reuses freed large blocks instead of page-faulting fresh ones."""

import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning applies to glibc only")

# a small training loop whose activations (64 MiB each) are far above glibc's mmap threshold; the minor page
# faults of a warm step are counted (a step's allocations are freed and made again every step)
_PROBE = """
import json, sys, torch
from violet_ds.engine import host_memory
if sys.argv[1] == "keep":
    host_memory.keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 256))
optimizer = torch.optim.AdamW(net.parameters())
x = torch.randn(4096, 256)
faults = []
for _ in range(6):
    before = host_memory.minor_page_faults()
    net(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    faults.append(host_memory.minor_page_faults() - before)
# the fewest of steps 4-6: Python's own small-object arenas (mmap'd by Python, not malloc) may fault a few pages
print(json.dumps({"faults": min(faults[3:]), "describe": host_memory.describe()}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_training_step_reuses_freed_memory_without_page_faults():
    activation_pages = 64 * 2**20 // 4096
    system, kept = _probe("system"), _probe("keep")
    # glibc's default returns each large block to the kernel on free: the next step faults them in again (zeroed)
    assert system["faults"] > activation_pages, system
    # kept: the step's blocks come back already mapped
    assert kept["faults"] < activation_pages // 4, kept
    assert "keeps freed memory" in kept["describe"] and "default" in system["describe"]


@glibc_only
def test_cpu_setup_keeps_host_memory_unless_switched_off():
    """What `setup_world` does on CPU: keep freed memory by default, leave malloc alone with the option off."""
    code = """
import os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
from violet_ds.commands.run import setup_world
from violet_ds.config import EngineConfig
from violet_ds.engine import host_memory
world = setup_world(EngineConfig(keep_host_memory=sys.argv[1] == "on"))
print(world.device.type, "|", host_memory.describe())
"""
    # a fresh single-process job: none of the launcher variables that other tests may have left in os.environ
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    on, off = (subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env)
               for mode in ("on", "off"))
    assert on.returncode == 0 and off.returncode == 0, on.stderr[-2000:] + off.stderr[-2000:]
    assert on.stdout.strip().splitlines()[-1].startswith("cpu | glibc malloc keeps freed memory"), on.stdout
    assert "default" in off.stdout.strip().splitlines()[-1], off.stdout
