"""Which rows each rank reads in each epoch (pure numpy, no DALI).

:class:`EpochPlan` is the sharding core of every loader: like ``torch.utils.data.DistributedSampler``, a
permutation drawn from ``(seed, epoch)`` (identical on every rank), split by global rank, the last
partial batch dropped or filled with repeats that are marked as padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .config import LAST_BATCH_POLICIES


@dataclass(frozen=True)
class EpochPlan:
    """Which rows one rank reads in each epoch.

    Args:
        num_samples: rows in the dataset (N).
        batch_size: samples per batch on this rank.
        rank, world_size: this rank's global rank and the number of ranks.
        seed: base of the epoch permutation (identical on every rank).
        shuffle: permute each epoch (else the natural order).
        last_batch: ``"drop"``: every rank reads ``N // world_size // batch_size`` full batches;
            ``"pad"``: every sample is read exactly once per epoch over all ranks, and batches are
            filled up with repeats marked invalid; every rank reads the same number of batches, each
            with at least one real sample (with ``batch_size`` 1, a rank whose shard is one sample
            short has a last batch of padding alone, which loaders skip).
    """

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    last_batch: str = "drop"

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.last_batch not in LAST_BATCH_POLICIES:
            raise ValueError(f"last_batch must be one of {LAST_BATCH_POLICIES}, got {self.last_batch!r}")
        if self.num_batches == 0:
            raise ValueError(f"{self.num_samples} samples over {self.world_size} ranks do not fill one "
                             f"batch of {self.batch_size}; use a smaller batch or last_batch='pad'")

    @property
    def samples_per_rank(self) -> int:
        if self.last_batch == "drop":
            return self.num_samples // self.world_size
        return -(-self.num_samples // self.world_size)

    @property
    def num_batches(self) -> int:
        if self.last_batch == "drop":
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The global order of epoch ``epoch`` (same on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def rows(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, valid)`` of this rank for ``epoch``, each ``num_batches * batch_size`` long."""
        order = self.permutation(epoch)
        shard = order[self.rank::self.world_size]
        total = self.num_batches * self.batch_size
        if self.last_batch == "drop":
            return shard[:total], np.ones(total, dtype=bool)
        filler = shard if len(shard) else order[:1]
        rows = np.resize(filler, total)
        valid = np.arange(total) < len(shard)
        size, count = self.batch_size, len(shard)
        if size > 1 and count and count == (self.num_batches - 1) * size:
            # This shard fills one batch fewer than the longest: its last batch would be all padding
            # and never yielded, and this rank would take one step fewer than the others (DDP would
            # hang). Move its last sample into that batch, leaving padding in the one before.
            last = total - size
            rows[last], valid[last] = rows[count - 1], True
            rows[count - 1], valid[count - 1] = rows[0], False
        return rows, valid
