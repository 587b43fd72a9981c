"""One run per run directory: a lock file with the live run's host and pid, and no silent overwrites.

`runs/<name>/run.lock` holds {host, pid, process start time, command, started}; rank 0 creates it with
O_EXCL before anything is written to the directory and removes it when the command ends. A heartbeat
thread touches it every `HEARTBEAT_S` seconds. An existing lock is stale (and taken over, with a
warning) when its process is gone: on the same host, when the pid is not running or runs another
process (start time differs); on another host, when its heartbeat is older than `STALE_AFTER_S`
(a node that died cannot remove its lock), or when it was taken by an earlier run of the same SLURM
job (a requeue: same job id, another restart count). Otherwise the second run is refused at once,
naming the live one. A lock file that is not a readable violet-ds lock (garbage, cut short) is stale when
nothing touched it for `STALE_AFTER_S`; before that it may be a live run's, and the refusal names the
file and how to remove it. `RunLock.check` is the same verdict without taking the lock (the training
commands call it before importing torch).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional


LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# an empty lock younger than this is being written by the run that created it: waited for, in this many looks
WRITING_S = 2.0
WRITING_TRIES = 10


class RunDirError(RuntimeError):
    """The run directory is in use or would be overwritten; the message says by whom / what to do."""


def _process_start(pid: int) -> Optional[str]:
    """Start time of `pid` (Linux /proc, in clock ticks since boot), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, command: str = "", warn: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.command = command
        self.warn = warn
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def _info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")}

    def _stale_reason(self, info: dict) -> Optional[str]:
        age = time.time() - self.path.stat().st_mtime
        job = os.environ.get("SLURM_JOB_ID")
        if job and info.get("slurm_job") == job and info.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT", "0"):
            # SLURM requeues a job (same id, next restart count) only after its previous run ended
            return f"it belongs to an earlier run of SLURM job {job} (requeued)"
        if info.get("host") == socket.gethostname():
            pid = int(info.get("pid") or -1)
            if pid == os.getpid():
                return "it is this process's own"
            if pid <= 0 or not _pid_alive(pid):
                return f"process {pid} is gone"
            start = _process_start(pid)
            if info.get("start") and start and start != info["start"]:
                return f"pid {pid} now belongs to another process"
            return None
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age:.0f} s old (> {STALE_AFTER_S:.0f} s)"
        return None

    def _read(self) -> tuple[Optional[dict], str]:
        """(the lock's fields, "") or (None, why it is not a readable violet-ds lock); FileNotFoundError when
        it is gone."""
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return None, "is not a violet-ds lock (not text)"
        except FileNotFoundError:
            raise
        except OSError as error:
            return None, f"cannot be read ({error.strerror or error})"
        if not text.strip():
            return None, "is empty"
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            return None, f"is not a violet-ds lock (not JSON: {text[:40]!r})"
        try:
            valid = isinstance(info, dict) and bool(info.get("host")) and int(info.get("pid")) > 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            return None, f"is not a violet-ds lock (no host and pid: {text[:60]!r})"
        return info, ""

    def _state(self) -> tuple[str, str, Optional[dict]]:
        """("free" | "live" | "stale" | "writing", message or reason, lock fields) of the lock file now."""
        try:
            info, problem = self._read()
            age = time.time() - self.path.stat().st_mtime
            if info is not None:
                reason = self._stale_reason(info)
        except FileNotFoundError:
            return "free", "", None
        if info is None:
            if problem == "is empty" and age < WRITING_S:
                return "writing", "", None  # created a moment ago, its fields not written yet
            if age > STALE_AFTER_S:
                return "stale", f"it {problem}, untouched for {age:.0f} s: no run heartbeats it", None
            return "live", (
                f"{self.path} {problem}; it was modified {age:.0f} s ago, so a run may still hold it. If no violet-ds "
                f"run uses {self.path.parent}, delete it (rm {self.path}) and start again (a lock untouched for "
                f"{STALE_AFTER_S:.0f} s is taken over by itself)"), None
        if reason is None:
            return "live", (
                f"{self.path.parent} is in use by a live run: {info.get('command') or 'violet-ds'} on host "
                f"{info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
                f"{', SLURM job ' + str(info['slurm_job']) if info.get('slurm_job') else ''}. Wait for it, "
                f"stop it, or choose another --run.name (if it is dead, delete {self.path})"), info
        return "stale", reason, info

    def check(self) -> None:
        """Refuse (RunDirError) when a live run holds the lock; a free or stale one passes (`acquire` takes it).
        Reads only: for a check before any heavy work."""
        for _ in range(WRITING_TRIES):
            state, message, _ = self._state()
            if state == "live":
                raise RunDirError(message)
            if state != "writing":
                return
            time.sleep(WRITING_S / WRITING_TRIES)

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(WRITING_TRIES):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                state, message, info = self._state()
                if state == "live":
                    raise RunDirError(message) from None
                if state == "writing":
                    time.sleep(WRITING_S / WRITING_TRIES)
                elif state == "stale":
                    self.warn(f"taking over the stale lock {self.path} ({message})" + (f": {info}" if info else ""))
                    self.path.unlink(missing_ok=True)
                continue  # free (released meanwhile), stale (removed) or being written: try again
            with os.fdopen(fd, "w") as handle:
                json.dump(self._info(), handle)
            self.held = True
            self._thread = threading.Thread(target=self._heartbeat, name="violet-ds-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunDirError(f"could not take the lock {self.path} (it keeps changing); is another run starting?")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self.held:
            try:
                info = json.loads(self.path.read_text())
                if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                    self.path.unlink()
            except (OSError, json.JSONDecodeError):
                pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_fresh_run(run_dir: Path, overwrite: bool, warn: Callable[[str], None] = print) -> None:
    """A run without --run.resume must not silently replace a run directory that holds checkpoints."""
    # engine.checkpoint imports torch: this module is on the CLI's light parse path (commands/train.py)
    from .checkpoint import complete_tags, has_checkpoints, read_latest

    checkpoint_dir = Path(run_dir) / "checkpoints"
    if not has_checkpoints(checkpoint_dir):
        return
    tags = complete_tags(checkpoint_dir)
    try:
        latest = read_latest(checkpoint_dir)
    except Exception:  # noqa: BLE001 - only for the message
        latest = None
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds checkpoints ({', '.join(tags[-3:]) or 'none complete'}"
            f"{', latest -> ' + latest if latest else ''}). Continue that run with --run.resume auto (or latest, "
            "or a tag), choose another --run.name, or start over with --run.overwrite true (deletes its checkpoints)")
    warn(f"--run.overwrite: deleting the checkpoints of the previous run in {checkpoint_dir} ({', '.join(tags)})")
    shutil.rmtree(checkpoint_dir)
