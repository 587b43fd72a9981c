"""The engine and the commands call declared contracts instead of probing objects.

A task has every hook of `violet_ds.tasks.base.Task` (with a default), configurations are typed dataclasses
(`violet_ds.config`), a World has `distributed` and `is_main`: code reads them directly. `getattr` / `hasattr`
remain only for duck typing on objects violet_ds does not define, each listed below with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "violet_ds"
SCANNED = ("engine", "commands")
PROBE = re.compile(r"\b(getattr|hasattr)\(")

# (file under violet_ds/, fragment of the line) -> why duck typing is right there
ALLOWED = {
    ("engine/trainer.py", "getattr(signal, name, None)"): "signal module constants differ between platforms",
    ("engine/trainer.py", 'getattr(engine, "monitor", None)'): "a DeepSpeed engine has a monitor only when built so",
    ("engine/deepspeed_engine.py", 'getattr(engine, "monitor", None)'): "DeepSpeed engine: monitor is optional",
    ("engine/deepspeed_engine.py", 'getattr(self.zero_optimizer, "_global_grad_norm", None)'):
        "DeepSpeed ZeRO / bf16 optimizer: the global gradient norm of the step, absent before the first one",
    ("engine/deepspeed_engine.py", 'getattr(zero_optimizer, "zenflow", False) and hasattr(torch, "_chunk_cat")'):
        "DeepSpeed ZeRO optimizer: ZenFlow swaps flatten itself; torch's private _chunk_cat is not in every version",
    ("engine/deepspeed_engine.py", 'getattr(g, "_zero_padding", False)'):
        "DeepSpeed ZeRO gradients: its alignment padding tensors carry the flag, others do not",
    ("engine/deepspeed_engine.py", "hasattr(p, PIPE_REPLICATED)"):
        "DeepSpeed parameters: pipeline-replicated ones carry the attribute (DeepSpeed's own norm checks the same)",
    ("engine/deepspeed_engine.py", "getattr(optimizer, attribute, None)"):
        "DeepSpeed optimizer wrappers name their loss scale differently (cur_scale / loss_scale)",
    ("engine/checkpoint.py", "getattr(importlib.import_module(module_name), name)"):
        "DeepSpeed's checkpoint classes resolved by name for the weights-only unpickler",
    ("engine/checkpoint.py", 'hasattr(errno, "EDQUOT")'): "errno module constants differ between platforms",
    ("engine/checkpoint.py", 'getattr(engine, "module", None)'): "a DeepSpeed engine (or a test's stand-in) may lack it",
    ("engine/guard.py", '"_abort_process_group"'): "a private torch.distributed function, absent in some versions",
    ("engine/guard.py", 'hasattr(signal, "SIGUSR2")'): "signal module constants differ between platforms",
    ("engine/guard.py", 'hasattr(signal, "pthread_sigmask")'): "signal module functions differ between platforms",
    ("engine/guard.py", "getattr(signal, name, None)"): "signal module constants differ between platforms",
    ("engine/guard.py", 'getattr(signal, "SIGURG", None)'): "signal module constants differ between platforms",
    ("engine/guard.py", '"_worker_pids_set"'): "torch DataLoader iterator internals (multi-process iterators only)",
    ("engine/guard.py", '"_workers"'): "torch DataLoader iterator internals (multi-process iterators only)",
    ("engine/guard.py", '"_shutdown_workers"'): "torch DataLoader iterator internals (multi-process iterators only)",
    ("engine/logging.py", 'getattr(record, "step_line", False)'):
        "a logging.LogRecord carries an `extra` field only when its caller passed one",
    ("engine/logging.py", 'getattr(log, "_violet_ds_ready", False)'): "a mark on a stdlib logging.Logger",
    ("engine/logging.py", "original = getattr(module, attribute)"): "swaps a library module's attribute by name",
    ("engine/logging.py", "return getattr(self.inner, name)"): "a wrapper delegating to DeepSpeed's monitor",
    ("engine/logging.py", 'getattr(monitor, "enabled", False)'): "DeepSpeed monitor attributes vary by version",
    ("engine/logging.py", '"wandb_monitor", None)'): "DeepSpeed monitor attributes vary by version",
    ("commands/run.py", 'hasattr(optimizer, "optimizer")'): "a DeepSpeed optimizer wrapper holds the torch optimizer",
}


def _probes() -> list[tuple[str, int, str]]:
    found = []
    for part in SCANNED:
        for path in sorted((PACKAGE / part).rglob("*.py")):
            relative = path.relative_to(PACKAGE).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if PROBE.search(line):
                    found.append((relative, number, line.strip()))
    return found


def test_engine_and_commands_probe_only_third_party_objects():
    unexplained = [f"violet_ds/{path}:{number}: {line}" for path, number, line in _probes()
                   if not any(path == file and fragment in line for file, fragment in ALLOWED)]
    assert not unexplained, ("getattr/hasattr on violet_ds objects (call the declared hook or field; duck typing on "
                             "a third-party object goes into ALLOWED with its reason):\n" + "\n".join(unexplained))


def test_every_allowed_probe_still_exists():
    lines = [(path, line) for path, _, line in _probes()]
    stale = [f"{file}: {fragment}" for file, fragment in ALLOWED
             if not any(path == file and fragment in line for path, line in lines)]
    assert not stale, "ALLOWED entries that match no line any more (remove them):\n" + "\n".join(stale)
