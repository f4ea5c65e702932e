"""Which rows each rank reads in each epoch (pure numpy, no DALI).

:class:`EpochPlan` is the sharding core of every loader: like ``torch.utils.data.DistributedSampler``, a
permutation drawn from ``(seed, epoch)`` (identical on every rank), split by global rank, the last
partial batch dropped or filled with repeats that are marked as padding. With ``repeats`` > 1 it
follows timm's ``RepeatAugSampler`` and torchvision's ``RASampler`` (repeated augmentation): every
sample of the permutation is taken ``repeats`` times in a row, the copies dealt out to the ranks in
turn, and each rank's epoch keeps its usual length.

Every epoch has one **global order** (:meth:`EpochPlan.sequence`), dealt round robin: rank ``r`` of
``S`` reads its positions ``r, r + S, r + 2S, ...``. So after every rank read ``k`` batches of ``b``,
exactly the first ``k * b * S`` positions are read (one exception below), and the rest of the epoch
is the rest of the order: :meth:`EpochPlan.rows` with ``start`` deals ``order[start:]`` to any number
of ranks with any batch size (elastic resume), and with the same ranks and batch size it is exactly
the rest of the uninterrupted epoch. The exception: with ``last_batch="pad"``, a rank whose share is
one batch short gives its last sample to its last batch, so before that batch the position is
``start`` with that sample still ``unread`` (:meth:`EpochPlan.position_after`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

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
    def order_length(self) -> int:
        """Positions of an epoch's global order that are dealt out (T): all ``num_samples``, or with
        ``repeats`` the rounded-down count every rank keeps, times the ranks."""
        if self.repeats > 1:
            kept = self.num_samples if self.num_samples < REPEAT_ROUND else self.num_samples // REPEAT_ROUND * REPEAT_ROUND
            return kept // self.world_size * self.world_size
        return self.num_samples

    @property
    def samples_per_rank(self) -> int:
        """Samples of a whole epoch on this rank (padding not counted)."""
        return self._per_rank(self.order_length)

    def _per_rank(self, remaining: int) -> int:
        """Samples each rank reads of ``remaining`` positions dealt round robin (the shortest share
        with ``"drop"``, the longest with ``"pad"``)."""
        if self.last_batch == "drop":
            return remaining // self.world_size
        return -(-remaining // self.world_size)

    @property
    def num_batches(self) -> int:
        """Batches of a whole epoch (every rank the same)."""
        return self.batches()

    def batches(self, start: int = 0, unread: Sequence[int] = ()) -> int:
        """Batches (every rank the same) of a pass that reads the epoch from ``start`` (and the
        positions ``unread`` before it); 0 when less than a batch per rank is left with ``"drop"``."""
        per_rank = self._per_rank(self._remaining(start, unread))
        if self.last_batch == "drop":
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def _remaining(self, start: int, unread: Sequence[int]) -> int:
        return len(unread) + max(0, self.order_length - start)

    def permutation(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (same on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def sequence(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, copy index)`` of the epoch's global order, :attr:`order_length` long: the
        permutation, or with ``repeats`` k each of its samples k times in a row."""
        order = self.permutation(epoch)
        if self.repeats == 1:
            return order, np.zeros(len(order), np.int64)
        total = self.order_length
        return np.repeat(order, self.repeats)[:total], np.tile(np.arange(self.repeats), len(order))[:total]

    def _positions(self, start: int, unread: Sequence[int]) -> np.ndarray:
        """The positions a pass from ``start`` deals out, in order: ``unread`` first, then the rest."""
        rest = np.arange(min(start, self.order_length), self.order_length)
        return np.concatenate([np.asarray(unread, np.int64), rest]) if len(unread) else rest

    def _check_start(self, start: int, unread: Sequence[int]) -> None:
        if start < 0 or any(not 0 <= int(u) < start for u in unread):
            raise ValueError(f"start {start} with unread positions {list(unread)[:4]} is not a position "
                             f"of an epoch of {self.order_length}")

    def rows(self, epoch: int, start: int = 0, unread: Sequence[int] = ()) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, valid)`` of this rank for ``epoch``, each ``batches(start, unread) * batch_size``
        long: the global order from ``start`` (``unread`` positions first) dealt round robin."""
        rows, valid, _ = self._batched(epoch, start, unread)
        return rows, valid

    def draw_epochs(self, epoch: int, start: int = 0, unread: Sequence[int] = ()) -> np.ndarray:
        """int64 key epochs of :meth:`rows`' samples, for the keyed crops and augmentations: ``epoch``
        itself, or with ``repeats`` k, ``epoch * k + copy`` so every copy of a sample draws its own
        crop, flip and augmentation (and no two epochs share a key). A key belongs to a position of
        the global order, so it does not change with the ranks, the batch size or a resume."""
        return epoch * self.repeats + self._batched(epoch, start, unread)[2]

    def position_after(self, batches: int, start: int = 0, unread: Sequence[int] = ()) -> Tuple[int, Tuple[int, ...]]:
        """``(start, unread)`` of the epoch's global position after every rank read ``batches``
        batches of a pass from ``start``/``unread``: every position before the new ``start`` is
        read except the new ``unread`` ones (with ``"pad"``, before the last batch, the samples that
        short ranks moved into it). ``batches`` must be below :meth:`batches` (after the last one
        the epoch is over)."""
        total = self.batches(start, unread)
        if not 0 <= batches < total:
            raise ValueError(f"position after {batches} batches of a pass of {total}")
        positions = self._positions(start, unread)
        read = np.zeros(len(positions), bool)
        read[:batches * self.batch_size * self.world_size] = True
        if self.last_batch == "pad" and self.batch_size > 1 and batches == total - 1:
            for rank in range(self.world_size):  # the samples moved into the last batch (_batched)
                count = len(positions[rank::self.world_size])
                if count and count == (total - 1) * self.batch_size:
                    read[rank + self.world_size * (count - 1)] = False
        before, window = len(unread), min(len(positions), batches * self.batch_size * self.world_size)
        cut = max(before, window)
        return start + max(0, window - before), tuple(int(p) for p in positions[:cut][~read[:cut]])

    def _batched(self, epoch: int, start: int = 0, unread: Sequence[int] = ()) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, valid, copy index)`` of this rank, batched: dropped or padded as ``last_batch`` says."""
        self._check_start(start, unread)
        order, drawn_copies = self.sequence(epoch)
        mine = self._positions(start, unread)[self.rank::self.world_size]
        shard, copies = order[mine], drawn_copies[mine]
        num_batches = self.batches(start, unread)
        total = num_batches * self.batch_size
        if self.last_batch == "drop":
            return shard[:total], np.ones(total, dtype=bool), copies[:total]
        filler = shard if len(shard) else order[:1]
        rows, drawn = np.resize(filler, total), np.resize(copies if len(shard) else np.zeros(1, np.int64), total)
        valid = np.arange(total) < len(shard)
        size, count = self.batch_size, len(shard)
        if size > 1 and count and count == (num_batches - 1) * size:
            # This shard fills one batch fewer than the longest: its last batch would be all padding
            # and never yielded, and this rank would take one step fewer than the others (DDP would
            # hang). Move its last sample into that batch, leaving padding in the one before.
            last = total - size
            rows[last], valid[last], drawn[last] = rows[count - 1], True, drawn[count - 1]
            rows[count - 1], valid[count - 1], drawn[count - 1] = rows[0], False, drawn[0]
        return rows, valid, drawn
