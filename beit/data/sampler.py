"""A distributed sampler that can resume in the middle of an epoch, sample-exactly.

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

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


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
