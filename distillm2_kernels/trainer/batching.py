"""Which pairs each process trains on at each micro-step: a deterministic plan that makes resuming exact.

Epoch e visits the N pairs in the order `randperm(N)` drawn from a generator seeded with `(seed, e)`, so the
order depends on nothing but the seed and the epoch. That order is extended by wrapping around to a multiple
of `batch_size × world_size × grad_accum` (as `DistributedSampler` pads), so that every optimizer step
accumulates exactly `grad_accum` full micro-batches on every process; a few pairs are then seen twice in an
epoch's last step. Micro-batch k of process r holds the positions
`[k·B·W + r·B, k·B·W + (r+1)·B)` of that order. Resuming after `s` optimizer steps of an epoch skips its
first `s × grad_accum` micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["BatchPlan"]


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    batch_size: int  # pairs per micro-batch per process
    world_size: int = 1
    grad_accum: int = 1
    seed: int = 42

    def __post_init__(self):
        for name in ("num_examples", "batch_size", "world_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.pairs_per_step)

    def order(self, epoch: int) -> list[int]:
        """The epoch's order of the pairs, wrapped around to `steps_per_epoch × pairs_per_step` entries."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_examples, generator=generator).tolist()
        return [permutation[k % self.num_examples] for k in range(self.steps_per_epoch * self.pairs_per_step)]

    def micro_batches(self, epoch: int, rank: int, start_step: int = 0) -> list[list[int]]:
        """Process `rank`'s micro-batches of `epoch` from optimizer step `start_step` on (grad_accum per step)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")
        order = self.order(epoch)
        per_micro = self.batch_size * self.world_size
        batches = []
        for k in range(start_step * self.grad_accum, self.steps_per_epoch * self.grad_accum):
            offset = k * per_micro + rank * self.batch_size
            batches.append(order[offset: offset + self.batch_size])
        return batches

    def as_dict(self) -> dict:
        return asdict(self)
