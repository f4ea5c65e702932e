"""Which rows each rank reads in each epoch (pure numpy, no DALI).

:class:`EpochPlan` is the sharding core of every loader: like ``torch.utils.data.DistributedSampler``, a
permutation drawn from ``(seed, epoch)`` (identical on every rank), split by global rank, the last
partial batch dropped or filled with repeats that are marked as padding. With ``repeats`` > 1 it
follows timm's ``RepeatAugSampler`` and torchvision's ``RASampler`` (repeated augmentation): every
sample of the permutation is taken ``repeats`` times in a row, the copies dealt out to the ranks in
turn, and each rank's epoch keeps its usual length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .config import LAST_BATCH_POLICIES

#: timm's and torchvision's repeated-augmentation samplers round the epoch down to a multiple of this.
REPEAT_ROUND = 256


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
        repeats: repeated augmentation (timm ``--aug-repeats``, torchvision ``--ra-sampler --ra-reps``):
            the permutation with each sample repeated ``repeats`` times, padded by wrapping to a
            multiple of ``world_size`` and dealt out rank by rank (so the copies of a sample land on
            different ranks when there are several), then every rank keeps ``N // 256 * 256 //
            world_size`` of its share, as both samplers do (``N // world_size`` when N < 256, where
            their rule would keep nothing). Each copy draws its own augmentation:
            :meth:`draw_epochs` gives it its own key.
    """

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    last_batch: str = "drop"
    repeats: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.last_batch not in LAST_BATCH_POLICIES:
            raise ValueError(f"last_batch must be one of {LAST_BATCH_POLICIES}, got {self.last_batch!r}")
        if self.num_batches == 0:
            raise ValueError(f"{self.num_samples} samples over {self.world_size} ranks do not fill one "
                             f"batch of {self.batch_size}; use a smaller batch or last_batch='pad'")

    @property
    def samples_per_rank(self) -> int:
        if self.repeats > 1:
            if self.num_samples < REPEAT_ROUND:
                return self.num_samples // self.world_size
            return self.num_samples // REPEAT_ROUND * REPEAT_ROUND // self.world_size
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

    def _shard(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """This rank's ``(rows, copy index)`` of ``epoch`` before batching."""
        order = self.permutation(epoch)
        if self.repeats == 1:
            shard = order[self.rank::self.world_size]
            return shard, np.zeros(len(shard), np.int64)
        repeated = np.repeat(order, self.repeats)
        copies = np.tile(np.arange(self.repeats), len(order))
        total = -(-len(repeated) // self.world_size) * self.world_size
        positions = np.resize(np.arange(len(repeated)), total)[self.rank::self.world_size][:self.samples_per_rank]
        return repeated[positions], copies[positions]

    def rows(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, valid)`` of this rank for ``epoch``, each ``num_batches * batch_size`` long."""
        rows, valid, _ = self.batched(epoch)
        return rows, valid

    def draw_epochs(self, epoch: int) -> np.ndarray:
        """int64 key epochs of :meth:`rows`' samples, for the keyed crops and augmentations: ``epoch``
        itself, or with ``repeats`` k, ``epoch * k + copy`` so every copy of a sample draws its own
        crop, flip and augmentation (and no two epochs share a key)."""
        return self.batched(epoch)[2]

    def batched(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`rows` and :meth:`draw_epochs` together: ``(rows, valid, key epochs)``."""
        rows, valid, copies = self._batched(epoch)
        return rows, valid, epoch * self.repeats + copies.astype(np.int64)

    def _batched(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, valid, copy index)``, batched: dropped or padded as ``last_batch`` says."""
        shard, copies = self._shard(epoch)
        total = self.num_batches * self.batch_size
        if self.last_batch == "drop":
            return shard[:total], np.ones(total, dtype=bool), copies[:total]
        filler = shard if len(shard) else self.permutation(epoch)[:1]
        rows, drawn = np.resize(filler, total), np.resize(copies if len(shard) else np.zeros(1, np.int64), total)
        valid = np.arange(total) < len(shard)
        size, count = self.batch_size, len(shard)
        if size > 1 and count and count == (self.num_batches - 1) * size:
            # This shard fills one batch fewer than the longest: its last batch would be all padding
            # and never yielded, and this rank would take one step fewer than the others (DDP would
            # hang). Move its last sample into that batch, leaving padding in the one before.
            last = total - size
            rows[last], valid[last], drawn[last] = rows[count - 1], True, drawn[count - 1]
            rows[count - 1], valid[count - 1], drawn[count - 1] = rows[0], False, drawn[0]
        return rows, valid, drawn
