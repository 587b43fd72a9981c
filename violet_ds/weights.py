"""The one path a weight file takes into a module: read it safely, rename its keys, load it strictly
(and the one writer of `.safetensors` files, `save_safetensors`).

Reading. `.safetensors` files hold tensors and nothing else. Torch files are pickles, and unpickling
can call any importable function, so they are read only through `safe_torch_load`
(`torch.load(weights_only=True)`: tensors and plain containers, plus classes a caller names); a
pickled module or any other object is refused with the file's name. Training scripts wrap their
weights (`{"state_dict": ...}`, `{"model": ...}`, `{"module": ...}`, the `module.` prefix of
DeepSpeed / DDP): `read_state_dict` takes the wrappers off. A model directory (`config.json` +
`model.safetensors`, see `violet_ds.pretrained`) reads as its weight file.

Loading. `load_checked` is the one loader: it compares the keys (`compare_keys`), refuses what the
caller's policy does not allow with a `WeightsMismatchError` naming every such key, loads the rest and
returns a `KeyReport` (loaded, initialised, unexpected, ignored keys). `load_strict` is its strict form:
only a state dict whose keys are exactly the module's, with the same shapes.

Which file a source is, and what it means, is decided once above this module: `Weights` is what that
entry returns (`engine.export.read_weights`: run and tag directories, model directories, `.safetensors`,
official checkpoints, through `models.checkpoint_io.read_weights_file` for files and model directories).
"""

from __future__ import annotations

import os
import pickle
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from violet_ds.errors import UserError

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

# the weight file of a model directory (next to its config.json; see `violet_ds.pretrained`)
MODEL_DIR_WEIGHTS = "model.safetensors"
# keys under which training scripts nest the weights, tried in this order
WRAPPER_KEYS = ("state_dict", "model", "module")
# a longer list is cut in messages; the count still says how many there are
_SHOWN = 20


class WeightsMismatchError(UserError, KeyError, ValueError):
    """A state dict does not fit a module; the message names the keys (a KeyError or ValueError for callers that
    catch those)."""

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
    if path.is_dir() and (path / "config.json").is_file() and (path / MODEL_DIR_WEIGHTS).is_file():
        path = path / MODEL_DIR_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
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
class Weights:
    """A state dict and what it was read from: `kind` is "deepspeed" (a run, checkpoints or tag directory),
    "model_dir", "safetensors", "official" (converted to violet_ds names) or "torch"; `path` is the file read
    (the tag directory of a DeepSpeed checkpoint, the model directory's weight file)."""

    state: StateDict
    kind: str
    path: Path


@dataclass
class KeyReport:
    """How a state dict's keys compare with a module's (sorted names; shape mismatches as (file, module) in the
    module's order, so the first is where the sizes part) and, after `load_checked`, what the load did:
    `loaded` tensors, `initialised` keys the module kept its own values for (absent from the file, or of
    another shape there), `ignored` keys the caller left out."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)
    initialised: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    loaded: int = 0

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
        mismatched={k: (tuple(state[k].shape), tuple(own[k].shape)) for k in own
                    if k in state and tuple(state[k].shape) != tuple(own[k].shape)})


def check_keys(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `WeightsMismatchError` naming every key unless `state` fits `own` exactly."""
    report = compare_keys(state, own)
    if not report.ok:
        raise WeightsMismatchError(f"{source}: {report.describe()}")


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict", *,
                 ignore: Sequence[str] = (), initialise: Optional[Callable[[str], bool]] = None,
                 allow_unexpected: bool = False) -> KeyReport:
    """Load `state` into `module` under a policy; raise `WeightsMismatchError` naming every key it refuses.

    Keys starting with a prefix in `ignore` are left out first (`report.ignored`). A module key for which
    `initialise(key)` is true may be absent from the file or have another shape there: the module keeps its
    own values (`report.initialised`). With `allow_unexpected`, file keys the module lacks are reported
    (`report.unexpected`) instead of refused. Nothing is loaded when a key is refused.
    """
    ignored = sorted(k for k in state if ignore and k.startswith(tuple(ignore)))
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(tuple(ignore)))}
    report = compare_keys(state, module.state_dict())
    may_initialise = initialise or (lambda key: False)
    refused = KeyReport(missing=[k for k in report.missing if not may_initialise(k)],
                        unexpected=[] if allow_unexpected else report.unexpected,
                        mismatched={k: v for k, v in report.mismatched.items() if not may_initialise(k)})
    if not refused.ok:
        raise WeightsMismatchError(f"{source}: {refused.describe()}")
    unusable = set(report.unexpected) | set(report.mismatched)
    loadable = {k: v for k, v in state.items() if k not in unusable}
    module.load_state_dict(loadable, strict=not (report.missing or report.mismatched))
    report.initialised = sorted(report.missing + list(report.mismatched))
    report.ignored, report.loaded = ignored, len(loadable)
    return report


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict",
                ignore: Sequence[str] = ()) -> KeyReport:
    """`module.load_state_dict(state, strict=True)`, after a check that names every key that does not fit.

    Keys starting with a prefix in `ignore` are left out first (e.g. a classifier a teacher does not use).
    """
    return load_checked(module, state, source, ignore=ignore)


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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    return path


__all__ = ["read_state_dict", "save_safetensors", "safe_torch_load", "unsafe_globals", "strip_prefix",
           "compare_keys", "check_keys", "load_checked", "load_strict", "KeyReport", "Weights",
           "WeightsMismatchError", "WRAPPER_KEYS", "MODEL_DIR_WEIGHTS",
           "NonFiniteWeightsError", "first_nonfinite", "check_finite"]
