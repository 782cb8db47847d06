"""A resumable, sharded epoch sampler whose samples carry their own augmentation seed.

Exact resumption needs two things a ``DistributedSampler`` plus global RNGs do not give:

- the order of an epoch must be a function of ``(seed, epoch)`` alone, and the sampler must be
  able to start mid-epoch (after the batches a killed run already trained on);
- the random augmentation of a sample must not depend on which data-loader worker drew it or on
  how many samples that worker drew before. So each index is yielded together with a seed derived
  from ``(seed, epoch, index)``, and :class:`cribo.data.images.UnlabeledImages` augments under
  that seed. As a bonus, the batches no longer depend on ``train.num_workers``.

Each process takes the global order ``rank, rank + world, ...`` after truncating it to a whole
number of global batches (``drop_last``, as the official code does).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of dataset item ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1 << 31, 1], dtype=np.uint64)))


class ResumableEpochSampler(Sampler):
    """Yields ``(index, augmentation_seed)`` for this process's share of one epoch.

    Call :meth:`set_epoch` before each epoch and :meth:`skip_batches` to start it after ``k`` batches.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = num_items // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the pretraining set has {num_items} images, fewer than one global batch "
                             f"({batch_size} x {world_size} processes); lower optim.batch_size")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def skip_batches(self, batches: int) -> None:
        if not 0 <= batches <= self.steps_per_epoch:
            raise ValueError(f"cannot skip {batches} batches of an epoch of {self.steps_per_epoch}")
        self.start_batch = batches

    def epoch_order(self) -> torch.Tensor:
        """This process's indices of the whole epoch (``steps_per_epoch * batch_size``)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g)[: self.steps_per_epoch * self.batch_size * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()[self.start_batch * self.batch_size:].tolist()
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in order])

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.batch_size
