"""The training loop's two questions to the data, answered for map-style datasets and streamed shards alike:
how many batches does each rank get per epoch (`batches_per_rank`), and which loader yields epoch e from
batch k on (`make_loader`).

Loader workers of map-style datasets persist across epochs: the sampler hands each worker (epoch, index)
pairs, so a worker's copy of the dataset learns the epoch with every sample. Shard datasets are configured
per epoch before their workers copy them, so they get fresh workers each epoch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
                epoch: int, start_batch: int, collate_fn: Callable | None, pin_memory: bool,
                reuse: DataLoader | None = None) -> DataLoader:
    """A loader for `epoch` on this rank that skips the first `start_batch` batches of the epoch.

    Everything random about an epoch's data is a function of (seed, epoch, sample), so the loader reproduces
    exactly the batches an uninterrupted run would see from batch `start_batch` on. `reuse`: this run's loader
    of an earlier epoch; a map-style one is repositioned and keeps its workers.
    """
    if reuse is not None and isinstance(reuse.sampler, _EpochIndices):
        reuse.sampler.position(epoch, start_batch * batch_size)
        return reuse
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = None
    if isinstance(dataset, ShardDataset):
        dataset.configure(rank, world_size, epoch, batch_size, start_batch)
    else:
        sampler = _EpochIndices(ResumableSampler(len(dataset), shuffle=True, seed=seed, rank=rank,
                                                 world_size=world_size, drop_last=True))
        sampler.position(epoch, start_batch * batch_size)
        dataset = _WithEpoch(dataset)
    # Its own generator: the loader's worker seeds must not be drawn from the global RNG, which checkpoints
    # restore (a resumed run creates one more loader than the run it continues).
    persistent = num_workers > 0 and sampler is not None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn, persistent_workers=persistent,
                      generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class _EpochIndices(Sampler):
    """A ResumableSampler's indices as (epoch, index) pairs, for `_WithEpoch` in persistent workers."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def position(self, epoch: int, start: int) -> None:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _WithEpoch(Dataset):
    """dataset[(epoch, i)] = dataset[i] drawn in that epoch (datasets without `set_epoch` ignore it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[i]
