"""A distributed sampler that resumes mid-epoch without replaying data, on any world size.

One global order per (seed, epoch) is drawn identically on every rank. Position p of that order
goes to rank `p % world`. The state is the epoch and a *global* cursor: how many samples of the
order all ranks together have consumed. Resuming hands out `order[cursor:]` round-robin over the
current ranks, so a run saved on 8 ranks resumes on 4 without skipping or repeating a sample
(provided ranks consume in lockstep, as a data-parallel loop does).

The trainer owns the cursor: DataLoader workers prefetch ahead of what the model consumed, so the
sampler's own position is not the run's. The run's position is a `SampleCursor`: the trainer advances
it per micro-batch, checkpoints store it, and `seek(cursor, batch_size)` starts a loader's sampler there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler


@dataclass
class SampleCursor:
    """Where a training run stands in its data: all that exact resume needs to restart the data stream."""

    epoch: int = 0
    micro_in_epoch: int = 0
    """micro-batches of `epoch` already consumed by each rank"""
    samples_seen: int = 0
    """samples consumed by all ranks together, all epochs"""

    def advance(self, batch_size: int, world_size: int) -> None:
        """One micro-batch consumed on every rank."""
        self.micro_in_epoch += 1
        self.samples_seen += batch_size * world_size

    def next_epoch(self) -> None:
        self.epoch += 1
        self.micro_in_epoch = 0

    def samples_in_epoch(self, batch_size: int, world_size: int) -> int:
        """Samples of the epoch's global order consumed by all ranks together (the sampler's cursor)."""
        return self.micro_in_epoch * batch_size * world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "samples_seen": self.samples_seen}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SampleCursor":
        # runs saved before samples_seen was recorded start counting from 0
        return cls(epoch=int(state["epoch"]), micro_in_epoch=int(state["micro_in_epoch"]),
                   samples_seen=int(state.get("samples_seen", 0)))


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, num_samples: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        if num_samples <= 0:
            raise ValueError(f"sampler needs at least one sample, got {num_samples}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"invalid rank {rank} for world size {world}")
        self.num_samples, self.rank, self.world = num_samples, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.cursor = 0

    # ---- the global order of one epoch
    @property
    def total(self) -> int:
        """Length of the epoch's global order (truncated or padded to a multiple of world)."""
        if self.drop_last:
            return (self.num_samples // self.world) * self.world
        return math.ceil(self.num_samples / self.world) * self.world

    def global_order(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = self.total
        if total <= self.num_samples:
            return order[:total]
        # pad by wrapping so every rank gets the same number of samples
        repeats = math.ceil(total / self.num_samples)
        return order.repeat(repeats)[:total]

    # ---- Sampler API
    def __iter__(self) -> Iterator[int]:
        remaining = self.global_order()[self.cursor:]
        return iter(remaining[self.rank::self.world].tolist())

    def __len__(self) -> int:
        remaining = max(0, self.total - self.cursor)
        return len(range(self.rank, remaining, self.world))

    # ---- state
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch`; the cursor goes back to 0 unless the epoch is the one already set (resume)."""
        if epoch != self.epoch:
            self.cursor = 0
        self.epoch = epoch

    def set_cursor(self, consumed: int) -> None:
        """Samples of this epoch already consumed by all ranks together."""
        if not 0 <= consumed <= self.total:
            raise ValueError(f"cursor {consumed} outside 0..{self.total}")
        self.cursor = consumed

    def advance(self, samples: int) -> None:
        self.set_cursor(min(self.total, self.cursor + samples))

    def seek(self, cursor: SampleCursor, batch_size: int) -> None:
        """Start where a run's cursor stands, for micro-batches of `batch_size` on each of this sampler's ranks."""
        self.set_epoch(cursor.epoch)
        self.set_cursor(cursor.samples_in_epoch(batch_size, self.world))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(f"sampler state is for {state['num_samples']} samples, dataset has "
                             f"{self.num_samples}: the data changed, resuming would not be exact")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this run uses {self.seed}")
        self.epoch = int(state["epoch"])
        # another world size pads the epoch differently: a finished epoch stays finished
        self.set_cursor(min(int(state["cursor"]), self.total))
