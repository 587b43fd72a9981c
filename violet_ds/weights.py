"""The one path a weight file takes into a module: read it safely, rename its keys, load it strictly
(and the one writer of `.safetensors` files, `save_safetensors`).

Reading. `.safetensors` files hold tensors and nothing else. Torch files are pickles, and unpickling
can call any importable function, so they are read only through `safe_torch_load`
(`torch.load(weights_only=True)`: tensors and plain containers, plus classes a caller names); a
pickled module or any other object is refused with the file's name. Training scripts wrap their
weights (`{"state_dict": ...}`, `{"model": ...}`, `{"module": ...}`, the `module.` prefix of
DeepSpeed / DDP): `read_state_dict` takes the wrappers off. A model directory (`config.json` +
`model.safetensors`, see `violet_ds.pretrained`) reads as its weight file.

Loading. `load_strict` loads only a state dict whose keys are exactly the module's, with the same
shapes; otherwise `WeightsMismatchError` names every missing, unexpected and mis-shaped key.
`compare_keys` makes the same report without loading, for callers with a policy of their own
(`run.init_from` initialises heads the file lacks).

Callers that add meaning stay thin on top of this module: the official key maps
(`models.checkpoint_io`), DeepSpeed run directories (`engine.export.read_weights`, and
`engine.checkpoint.safe_load` with DeepSpeed's own classes allowed), teachers (`targets.*`).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from violet_ds.errors import UserError

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

# keys under which training scripts nest the weights, tried in this order
WRAPPER_KEYS = ("state_dict", "model", "module")
# a longer list is cut in messages; the count still says how many there are
_SHOWN = 20


class WeightsMismatchError(UserError, KeyError):
    """A state dict does not fit a module; the message names the keys (a KeyError for callers that catch those)."""

    def __str__(self) -> str:
        # KeyError would print the quoted repr of the message
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------------------ reading

def safe_torch_load(path: PathLike, map_location: Any = "cpu", mmap: bool = False,
                    allowed_globals: Iterable[Any] = ()) -> Any:
    """`torch.load(weights_only=True)`, admitting `allowed_globals` besides tensors and plain containers.

    Raises torch's own errors (`pickle.UnpicklingError` for a refused object); callers word them.
    """
    with torch.serialization.safe_globals(list(allowed_globals)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or "mmap" not in str(error):
                raise
            # a legacy (non-zip) torch file cannot be memory-mapped; read it whole
            return torch.load(path, map_location=map_location, weights_only=True)


def unsafe_globals(path: PathLike) -> List[str]:
    """The globals a torch file would make the unpickler import (empty when that cannot be told). Zip files
    are read by torch; a plain pickle (the legacy format) is scanned opcode by opcode, never run."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only used to make a refusal message more precise
        pass
    try:
        return _pickle_globals(Path(path).read_bytes())
    except Exception:  # noqa: BLE001
        return []


def _pickle_globals(data: bytes) -> List[str]:
    """`module.name` of every GLOBAL / STACK_GLOBAL opcode of one pickle (torch's own storage types aside)."""
    import pickletools

    found, strings = [], []
    for opcode, arg, _ in pickletools.genops(data):
        if isinstance(arg, str) and "UNICODE" in opcode.name:
            strings = (strings + [arg])[-2:]
        elif opcode.name == "GLOBAL":
            found.append(arg.replace(" ", ".", 1))
        elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
            found.append(".".join(strings))
    return sorted({name for name in found if not name.startswith(("torch.", "collections.OrderedDict"))})


def _unwrap(obj: Any, path: Path) -> StateDict:
    while isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
            raise ValueError(f"{path}: not a state dict (non-tensor entries {bad})")
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = strip_prefix(obj, "module.")
    return obj


def _unreadable_safetensors(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable .safetensors file ({error}); it is truncated or damaged "
                      f"({path.stat().st_size} bytes): copy or export it again")


def safetensors_keys(path: PathLike) -> list[str]:
    """The tensor names of a `.safetensors` file, read from its header only (no tensor is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except OSError:
        raise
    except Exception as error:  # safetensors' SafetensorError: a header cut short or damaged
        raise _unreadable_safetensors(path, error) from None


def read_state_dict(path: PathLike) -> StateDict:
    """A state dict from `.safetensors`, a torch file (weights only) or a model directory, unwrapped."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except OSError:
            raise
        except Exception as error:  # safetensors' SafetensorError: a header or data region cut short or damaged
            raise _unreadable_safetensors(path, error) from error
    try:
        obj = safe_torch_load(path)
    except pickle.UnpicklingError as error:
        refused = unsafe_globals(path)
        what = f"refused globals: {', '.join(refused)}" if refused else f"{type(error).__name__}: {error}"
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({what}). Pickled modules and other "
                         "objects cannot be loaded safely: save `module.state_dict()` instead") from None
    except Exception as error:  # truncated or not a torch file: the unpickler's errors are many types
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(error).__name__}: {error})") from error
    return _unwrap(obj, path)


# ------------------------------------------------------------------------------------------ keys

def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The keys under `prefix`, with it removed; the others are left out."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class KeyReport:
    """How a state dict's keys compare with a module's: sorted names, shapes as (file, module)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        def named(names: Sequence[str]) -> str:
            more = f" ... (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
            return f"{list(names[:_SHOWN])}{more} ({len(names)})"

        parts = []
        if self.missing:
            parts.append(f"missing keys {named(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {named(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k}: file {file} vs module {own}" for k, (file, own) in self.mismatched.items()]
            parts.append(f"shape mismatches {named(shapes)}")
        return "; ".join(parts)


def compare_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> KeyReport:
    """Compare a state dict with a module's own (`module.state_dict()`, or the part of it being loaded)."""
    return KeyReport(
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        mismatched={k: (tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(state)
                    if k in own and tuple(state[k].shape) != tuple(own[k].shape)})


def check_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `WeightsMismatchError` naming every key unless `state` fits `own` exactly."""
    report = compare_keys(state, own)
    if not report.ok:
        raise WeightsMismatchError(f"{source}: {report.describe()}")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict",
                ignore: Sequence[str] = ()) -> None:
    """`module.load_state_dict(state, strict=True)`, after a check that names every key that does not fit.

    Keys starting with a prefix in `ignore` are left out first (e.g. a classifier a teacher does not use).
    """
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))} if ignore else dict(state)
    check_keys(state, module.state_dict(), source)
    module.load_state_dict(state, strict=True)


class NonFiniteWeightsError(UserError, ValueError):
    """A weight tensor holds NaN or Inf values (weights of a diverged run); the message names file and tensor."""


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` (in its order) with a NaN or Inf value, else None."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            if not bool(torch.isfinite(value).all()):
                return key
    return None


def check_finite(state: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Raise `NonFiniteWeightsError` naming `source` and the first tensor with a NaN or Inf value (`hint`: what
    to do instead, appended to the message)."""
    key = first_nonfinite(state)
    if key is not None:
        raise NonFiniteWeightsError(
            f"{source}: tensor {key} holds non-finite values (NaN/Inf): these weights give NaN outputs (a diverged "
            "run)" + (f"; {hint}" if hint else ""))


# ------------------------------------------------------------------------------------------ writing
def current_umask() -> int:
    """The process's umask (from /proc on Linux; elsewhere set and put back at once)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Dict[str, str] | None = None) -> Path:
    """Write a `.safetensors` file atomically (a `.tmp` file renamed over `path`) with the mode any new file
    gets under the user's umask (0644 with umask 022): safetensors itself creates its files 0600."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    return path


__all__ = ["read_state_dict", "save_safetensors", "safe_torch_load", "unsafe_globals", "strip_prefix",
           "compare_keys", "check_keys", "load_strict", "KeyReport", "WeightsMismatchError", "WRAPPER_KEYS",
           "NonFiniteWeightsError", "first_nonfinite", "check_finite"]
