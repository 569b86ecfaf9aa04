"""The training loop's two questions to the data, answered for map-style datasets and streamed shards alike:
how many batches does each rank get per epoch (`batches_per_rank`), and which loader yields epoch e from
batch k on (`make_loader`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from .sampler import ResumableSampler
from .shards import ShardDataset


def batches_per_rank(dataset: Dataset, batch_size: int, world_size: int, num_workers: int, epochs: float) -> int:
    """Batches of `batch_size` every rank can take in every one of the first ceil(`epochs`) epochs.

    Map-style: len // world_size // batch_size (the sampler's drop_last). Shards: the minimum over ranks and
    epochs of the full batches the rank's workers hold (see beit/data/shards.py), so all ranks step together.
    """
    if not isinstance(dataset, ShardDataset):
        return len(dataset) // world_size // batch_size
    dataset.check_world_size(world_size)
    return min(int(dataset.epoch_batches(e, world_size, num_workers, batch_size).sum(1).min())
               for e in range(max(1, math.ceil(epochs))))


def optimizer_steps_per_epoch(dataset: Dataset, batch_size: int, accum_steps: int, world_size: int,
                              num_workers: int, epochs: float, steps: int | None = None) -> int:
    """`batches_per_rank // accum_steps`, over every epoch the run reaches: ceil(`epochs`), or when the run
    is `steps` optimizer steps long, as many epochs as those take (shards: fewer steps per epoch can mean
    more epochs, so this is iterated until it settles)."""
    per_epoch = batches_per_rank(dataset, batch_size, world_size, num_workers, epochs) // accum_steps
    while steps and per_epoch:
        fewer = batches_per_rank(dataset, batch_size, world_size, num_workers, steps / per_epoch) // accum_steps
        if fewer == per_epoch:
            break
        per_epoch = fewer
    return per_epoch


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int,
                epoch: int, start_batch: int, collate_fn: Callable | None, pin_memory: bool) -> DataLoader:
    """A fresh loader for `epoch` on this rank that skips the first `start_batch` batches of the epoch.

    Everything random about an epoch's data is a function of (seed, epoch, sample), so the loader reproduces
    exactly the batches an uninterrupted run would see from batch `start_batch` on.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = None
    if isinstance(dataset, ShardDataset):
        dataset.configure(rank, world_size, epoch, batch_size, start_batch)
    else:
        sampler = ResumableSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size,
                                   drop_last=True)
        sampler.set_epoch(epoch)
        sampler.set_start(start_batch * batch_size)
    # Its own generator: the loader's worker seeds must not be drawn from the global RNG, which checkpoints
    # restore (a resumed run creates one more loader than the run it continues).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
