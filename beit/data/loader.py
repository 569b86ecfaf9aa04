"""The training loop's two questions to the data, answered for map-style datasets and streamed shards alike:
how many batches does each rank get per epoch (`batches_per_rank`), and which loader yields epoch e from
batch k on (`make_loader`).

Loader workers of map-style datasets persist across epochs: the sampler hands each worker (epoch, index)
pairs, so a worker's copy of the dataset learns the epoch with every sample. Shard datasets are configured
per epoch before their workers copy them, so they get fresh workers each epoch.

`ResumableSampler`, the map-style loader's sampler, is distributed and resumes in the middle of an epoch,
sample-exactly.

Order. The epoch's permutation depends only on (seed, epoch). With `world_size` ranks, the first
`total = n - n % world_size` positions (drop_last) or the permutation padded by wrapping to a multiple of
`world_size` (no drop_last) are dealt round-robin: rank r gets `perm[r::world_size]`, so every rank has the same
count. Consequence (tested): global batch b of one process with batch size W*B is exactly the union of batch b
of W ranks with batch size B, since both are perm[W*B*b : W*B*(b+1)]. Hence the global sample stream does not
depend on the number of ranks, and a run can resume with a different world size.

Resume. After `s` global samples of epoch e were consumed (s a multiple of the global batch), call
`set_epoch(e)` then `set_start(s // world_size)` on every rank: the rank skips its first s // world_size
indices and yields the rest. `set_epoch` with a *different* epoch clears the start, so the next epoch is full.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .shards import ShardDataset


class ResumableSampler(Sampler[int]):
    """Deterministic (seed, epoch) permutation, sharded over ranks, with a per-rank start offset."""

    def __init__(
        self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True
    ):
        if n < 1:
            raise ValueError(f"ResumableSampler: the dataset is empty (n={n})")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and n < world_size:
            raise ValueError(f"ResumableSampler: {n} samples cannot be shared by {world_size} ranks with drop_last")
        self.n, self.shuffle, self.seed = n, shuffle, int(seed)
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0
        # Samples per rank per epoch: truncated (drop_last) or padded by wrapping, equal on every rank.
        self.num_per_rank = n // world_size if drop_last else -(-n // world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a different epoch than the current one clears `start`."""
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, k: int) -> None:
        """Skip the first `k` samples of this rank in the current epoch (k = global samples done // world_size)."""
        if not 0 <= k <= self.num_per_rank:
            raise ValueError(f"ResumableSampler.set_start: k={k} outside [0, {self.num_per_rank}] for this rank")
        self.start = int(k)

    def permutation(self) -> np.ndarray:
        """The epoch's global order (all ranks), a function of (seed, epoch) only."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def rank_indices(self) -> np.ndarray:
        """This rank's full index list for the current epoch (before `start`)."""
        perm = self.permutation()
        total = self.num_per_rank * self.world_size
        if total > self.n:  # pad by wrapping around, as DistributedSampler does
            perm = np.resize(perm, total)
        return perm[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.num_per_rank - self.start


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
