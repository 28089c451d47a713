"""Which examples each process trains on at each optimizer step, and how many steps a run has."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatches:
    """Deterministic data order: which example indices each process uses at each step.

    Epoch e visits a permutation seeded by (seed, e). One optimizer step consumes a global batch
    of `micro_batch x grad_accum x world_size` examples; micro-batch m of process p takes the
    slice at (m * world_size + p). The order depends only on the seed, never on the number of
    processes, which makes resume exact and lets 1 process and N processes see the same data.
    """

    num_examples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_examples // self.global_batch)

    def _order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen)

    def step_indices(self, step: int, rank: int) -> list[list[int]]:
        """Index lists of this process's micro-batches for optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = within * self.global_batch
        chunk = order[start:start + self.global_batch]
        if len(chunk) < self.global_batch:  # dataset smaller than one global batch: wrap around
            chunk = order.repeat(math.ceil(self.global_batch / self.num_examples))[:self.global_batch]
        out = []
        for m in range(self.grad_accum):
            at = (m * self.world_size + rank) * self.micro_batch
            out.append(chunk[at:at + self.micro_batch].tolist())
        return out

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def total_steps(num_examples: int, batches: GlobalBatches, epochs: int, max_steps: int) -> int:
    """--max-steps when it is set, else `epochs` passes over the data."""
    return max_steps if max_steps > 0 else batches.steps_per_epoch * epochs
