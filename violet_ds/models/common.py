"""Small helpers every model file uses."""

from __future__ import annotations

from typing import Optional

from torch import nn


def count_parameters(part: Optional[nn.Module | nn.Parameter]) -> int:
    """Number of parameter elements of a module (shared ones once) or of one parameter; 0 for None."""
    if part is None:
        return 0
    if isinstance(part, nn.Parameter):
        return part.numel()
    return sum(p.numel() for p in part.parameters())


__all__ = ["count_parameters"]
