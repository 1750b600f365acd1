"""Batches that make N data-parallel ranks x batch b train exactly like one process x N*b.

Each epoch draws one permutation from the run's seeded generator (every rank holds the
same generator, so the same permutation), cuts it into global batches of N*b crystals and
gives rank r the r-th contiguous slice of each. The union over ranks of step k is the
batch a single process with batch N*b would take at step k, and :meth:`loss_scale` makes
DDP's gradient average equal that process's mean over the global batch even for the
last, partial batch. Unlike ``DistributedSampler`` no crystal is repeated to pad an
epoch, so an epoch means the same data on any number of GPUs, and a checkpoint moves
between 1- and N-GPU runs without changing what an epoch is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class GlobalBatchSampler:
    """Batch sampler of one rank (a DataLoader ``batch_sampler``)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need at least one item and a positive batch ({n}, {batch_size})")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world_size = rank, world_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.global_batch)

    def global_size(self, step: int) -> int:
        """Crystals in global batch ``step`` (all ranks together)."""
        return min(self.global_batch, self.n - step * self.global_batch)

    def _bounds(self, step: int) -> tuple[int, int]:
        base, extra = divmod(self.global_size(step), self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def local_size(self, step: int) -> int:
        """Crystals of this rank in ``step``; 0 means its batch is a stand-in of weight 0."""
        lo, hi = self._bounds(step)
        return hi - lo

    def loss_scale(self, step: int, n_targets: int) -> float:
        """Factor on this rank's summed |error| so DDP's mean of gradients over ranks is
        the gradient of the mean error over the global batch."""
        if self.local_size(step) == 0:
            return 0.0
        return self.world_size / (self.global_size(step) * n_targets)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=self.generator)
        for step in range(len(self)):
            start = step * self.global_batch
            lo, hi = self._bounds(step)
            # A rank without crystals in a tiny last batch still runs a step (weight 0), so
            # every rank joins every gradient all-reduce.
            if hi == lo:
                lo, hi = 0, 1
            yield perm[start + lo:start + hi].tolist()
