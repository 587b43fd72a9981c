"""Restricted unpickling for the official data pickles.

Unpickling can call any importable function, so a pickle from the internet is code. The official
files only need plain containers, strings, bytes and numpy arrays; this unpickler admits exactly the
globals that numpy's array pickling uses and refuses everything else with the file and name.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Union

# (module, name) pairs numpy arrays pickle through, across numpy 1.x (`numpy.core`) and 2.x (`numpy._core`).
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
})


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str = "<bytes>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refuses to load global {module}.{name} (only numpy arrays and plain "
            "containers are allowed in data pickles)")


def load_restricted_pickle(path_or_bytes: Union[str, os.PathLike, bytes]) -> Any:
    """Load a data pickle with the restricted unpickler."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return RestrictedUnpickler(io.BytesIO(path_or_bytes)).load()
    with open(path_or_bytes, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, source=str(path_or_bytes)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise pickle.UnpicklingError(f"{path_or_bytes}: not a valid pickle ({err})") from err
