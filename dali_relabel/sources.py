"""The per-sample external source: image bytes, label map and row id from one call.

:class:`EpochPlan` decides which rows a rank reads in an epoch (like ``DistributedSampler``: a
permutation from ``(seed, epoch)``, split by global rank, the last partial batch dropped or padded with
samples marked invalid). :class:`SampleSource` is the callable handed to DALI's parallel
``fn.external_source``: for ``SampleInfo(idx_in_epoch, ..., epoch_idx)`` it returns the encoded image,
its label map (from the same store row), the hard label, the row id and a validity flag. Because the
image path and the map come from the same row in the same call, an image can never be paired with
another image's map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .mixing import CutMixSpec
from .store import LabelStore

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OTHER_MAGICS = (b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_EOI_SEARCH_BYTES = 4096


#: Values of the ``valid`` output.
PADDING, VALID, SKIPPED = 0, 1, 2


class BadImageError(ValueError):
    """An image file cannot be decoded; the message names the file."""


def check_encoded_image(data: np.ndarray, path: str) -> None:
    """Cheap structural check of an encoded image (raises :class:`BadImageError`).

    Catches empty files, files that are no image at all and truncated JPEG/PNG files (their end
    marker is missing), which would otherwise stop the whole DALI pipeline without naming the file.
    CMYK and grayscale JPEGs and PNGs named ``.JPEG`` pass: DALI decodes them.
    """
    head = data[:8].tobytes()
    if data.size == 0:
        raise BadImageError(f"{path}: empty file")
    if head.startswith(JPEG_MAGIC):
        if data[-_EOI_SEARCH_BYTES:].tobytes().rfind(b"\xff\xd9") < 0:
            raise BadImageError(f"{path}: truncated JPEG (no end-of-image marker)")
    elif head.startswith(PNG_MAGIC):
        if data[-_EOI_SEARCH_BYTES:].tobytes().rfind(b"IEND") < 0:
            raise BadImageError(f"{path}: truncated PNG (no IEND chunk)")
    elif not head.startswith(OTHER_MAGICS):
        raise BadImageError(f"{path}: not a recognised image format (starts with {head[:4]!r})")


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
            filled up with repeats marked invalid (all ranks read the same number of batches).
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
        if self.last_batch not in ("drop", "pad"):
            raise ValueError(f"last_batch must be 'drop' or 'pad', got {self.last_batch!r}")
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
        return rows, valid


class SampleSource:
    """Callable for a parallel, per-sample ``fn.external_source``.

    Args:
        image_root: directory the relative paths are relative to.
        relpaths: relative image path of every row.
        labels: hard label of every row.
        plan: the :class:`EpochPlan` of this rank.
        store_path: label store whose row ``r`` is the map of ``relpaths[r]``; ``None`` for a source
            without maps (validation).
        epoch_offset: added to DALI's epoch counter (to resume at a later epoch).
        skip_bad_images: replace an undecodable image by another sample marked invalid (and count
            it) instead of raising :class:`BadImageError`.
        cutmix: draw a CutMix box for each pair of batch positions (adds the ``mix_box`` output).
        resume_batch: in the first epoch, start at this batch (resuming mid-epoch).

    Outputs per sample: ``jpeg`` uint8 ``[n]``, then (with a store) ``logits [k, H, W]`` and
    ``class_ids [k, H, W]``, then ``label`` int32 ``[1]``, ``row`` int64 ``[1]`` and ``valid`` uint8
    ``[1]``: :data:`VALID`, :data:`PADDING` (a repeat that fills the last batch) or :data:`SKIPPED`
    (a stand-in for a bad image). Only :data:`VALID` samples are meant to be trained on. With
    ``cutmix``, a last output ``mix_box`` float32 ``[4]``.
    """

    def __init__(self, image_root: str, relpaths: Sequence[str], labels: Sequence[int], plan: EpochPlan,
                 store_path: Optional[str] = None, epoch_offset: int = 0, skip_bad_images: bool = False,
                 cutmix: Optional[CutMixSpec] = None, resume_batch: int = 0):
        self.image_root = os.fspath(image_root)
        self.relpaths: List[str] = list(relpaths)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.plan = plan
        self.store_path = store_path
        self.epoch_offset = epoch_offset
        self.skip_bad_images = skip_bad_images
        self.cutmix = cutmix
        if not 0 <= resume_batch < plan.num_batches:
            raise ValueError(f"resume_batch {resume_batch} is outside the epoch's {plan.num_batches} batches")
        self.resume_batch = resume_batch
        self._store: Optional[LabelStore] = None
        self._epoch = None
        self._rows = self._valid = None
        self.bad_images: List[str] = []

    def _plan_for(self, epoch: int):
        if self._epoch != epoch:
            self._rows, self._valid = self.plan.rows(epoch + self.epoch_offset)
            if epoch == 0 and self.resume_batch:
                skip = self.resume_batch * self.plan.batch_size
                self._rows, self._valid = self._rows[skip:], self._valid[skip:]
            self._epoch = epoch
        return self._rows, self._valid

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches DALI epoch ``epoch`` (counted from this source's start) will yield."""
        return self.plan.num_batches - (self.resume_batch if epoch == 0 else 0)

    def store(self) -> LabelStore:
        # Opened lazily in the worker process that uses it (never shared across fork).
        if self._store is None:
            self._store = LabelStore(self.store_path, check_values=False)
        return self._store

    def read_image(self, row: int) -> np.ndarray:
        path = os.path.join(self.image_root, self.relpaths[row])
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise BadImageError(f"{path}: cannot be read ({error.strerror or error})") from None
        check_encoded_image(data, path)
        return data

    def __call__(self, sample_info):
        rows, valid = self._plan_for(sample_info.epoch_idx)
        index = sample_info.idx_in_epoch
        if index >= len(rows):
            raise StopIteration
        row, status = int(rows[index]), VALID if valid[index] else PADDING
        try:
            data = self.read_image(row)
        except BadImageError as error:
            if not self.skip_bad_images:
                raise
            self.bad_images.append(str(error))
            row, data = self._substitute(rows, index)
            status = SKIPPED
        outputs = [data]
        if self.store_path:
            label_map = self.store().read_checked(row)
            outputs += [label_map.logits, label_map.class_ids]
        outputs += [np.array([self.labels[row]], dtype=np.int32), np.array([row], dtype=np.int64),
                    np.array([status], dtype=np.uint8)]
        if self.cutmix is not None:
            epoch = sample_info.epoch_idx + self.epoch_offset
            iteration = sample_info.iteration + (self.resume_batch if sample_info.epoch_idx == 0 else 0)
            outputs.append(self.cutmix.box(epoch, iteration, sample_info.idx_in_batch, self.plan.batch_size))
        return tuple(outputs)

    def _substitute(self, rows: np.ndarray, index: int):
        """Another decodable sample of this epoch, to fill a bad image's slot (marked invalid)."""
        for step in range(1, len(rows)):
            candidate = int(rows[(index + step) % len(rows)])
            try:
                return candidate, self.read_image(candidate)
            except BadImageError:
                continue
        raise BadImageError("no decodable image left in this epoch")


def describe_outputs(source: SampleSource):
    """(names, DALI dtypes, ndims) of the source's outputs, in order."""
    from nvidia.dali import types

    with_maps = bool(source.store_path)
    names = ["jpegs"] + (["logits", "class_ids"] if with_maps else []) + ["labels", "rows", "valid"]
    dtypes = [types.UINT8] + ([None, None] if with_maps else []) + [types.INT32, types.INT64, types.UINT8]
    ndims = [1] + ([3, 3] if with_maps else []) + [1, 1, 1]
    if source.cutmix is not None:
        names, dtypes, ndims = names + ["mix_box"], dtypes + [types.FLOAT], ndims + [1]
    return names, dtypes, ndims
