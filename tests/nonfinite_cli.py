"""The violet-ds CLI with non-finite losses injected at chosen optimizer steps, for the divergence-guard tests.

    python tests/nonfinite_cli.py --nonfinite 5,6[@RANK] pretrain --config run.yaml ...

Registers `NonFiniteSteps` as `violet_ds.engine.divergence.loss_fault` and runs the command as `violet-ds`
would. The guard then sees a NaN loss at each listed step (each step once: a step reached again after a
rollback is clean), on every rank or on RANK only; the loss trained on is untouched. The DeepSpeed launcher
can start this file in place of `--module violet_ds.cli` (its `--local_rank` argument passes through).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from violet_ds.cli import main
from violet_ds.engine import divergence

OPTION = "--nonfinite"


class NonFiniteSteps:
    """`loss_fault`: NaN at the optimizer steps `steps` (each once), on `rank` only when given."""

    def __init__(self, steps: set[int], rank: Optional[int] = None):
        self.pending = set(steps)
        self.rank = rank
        self.current: Optional[int] = None

    @classmethod
    def parse(cls, spec: str) -> "NonFiniteSteps":
        """"5,6" (every rank) or "5,6@1" (rank 1 only)."""
        steps, _, rank = spec.partition("@")
        return cls({int(part) for part in steps.split(",") if part.strip()}, int(rank) if rank.strip() else None)

    def __call__(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        if self.current is not None and step != self.current:
            # the injected step ended: its number is spent
            self.pending.discard(self.current)
            self.current = None
        if step not in self.pending or (self.rank is not None and rank != self.rank):
            return loss
        self.current = step
        return torch.full_like(loss.detach(), float("nan"))


def split_argv(argv: list[str]) -> tuple[str, list[str]]:
    """(the --nonfinite value, the rest of argv in order)."""
    at = argv.index(OPTION)
    return argv[at + 1], argv[:at] + argv[at + 2:]


if __name__ == "__main__":
    spec, rest = split_argv(sys.argv[1:])
    divergence.loss_fault = NonFiniteSteps.parse(spec)
    sys.argv = ["violet-ds", *rest]
    main()
