"""Training and validation batches streamed from tar shards (:mod:`dali_relabel.shards`).

:class:`ShardReLabelLoader` yields the same ``(images, soft_targets)`` as
:class:`~dali_relabel.loader.ReLabelLoader`, from DALI's webdataset reader instead of an image tree and
a store: the same keyed crops (a row's crop in an epoch is the same on both paths), the same pooling
operator, CutMix modes, Mixup and smoothing. What "shuffle" means differs: the tree path reads a full
permutation of the rows each epoch; here each epoch reads the shards in a new seeded order, every rank
takes its contiguous part of that sequence (DALI's ``shard_id``/``num_shards``), and a buffer of
samples is shuffled as they stream in. Rows were already spread randomly over the shards when they
were written, so every batch mixes classes.

Each pass reads its own epoch's pipeline (the shard order is fixed when a pipeline is built). The
next epoch's is built on a helper thread while a pass takes its last batches, so the next pass starts
on a pipeline that already has its first batches (:mod:`dali_relabel.lookahead`); a pass that starts
elsewhere (``set_epoch``, ``load_state_dict``, ``mixup_enabled`` changed) drops it and builds its own.
A resumed pass restores the reader's position with DALI's pipeline checkpointing (``state_dict``
carries the checkpoint), so it continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import abc
import base64
import os
from typing import List, Optional

import numpy as np

from .config import DataConfig
from .devices import device_index, resolve_device
from .distributed import resolve_rank
from .errors import DaliRelabelError
from .loader import mix_batch, training_batch, validation_batch
from .loader_state import LoaderDataset, LoaderState, Pass, superseded
from .lookahead import Pace, PipelineAhead
from .mixing import CutMixSpec
from .shards import ShardSet
from .watchdog import shutdown_pipeline


def rank_samples(num_samples: int, world_size: int) -> List[int]:
    """Samples of each rank under DALI's sharding: ``floor((r + 1) N / S) - floor(r N / S)``."""
    return [(r + 1) * num_samples // world_size - r * num_samples // world_size for r in range(world_size)]


class _BoxSource:
    """CutMix boxes per batch for the shard graph, keyed like the tree path's (``BatchInfo``)."""

    def __init__(self, cutmix: CutMixSpec, epoch: int, batch_size: int, mixing: bool):
        self.cutmix, self.epoch, self.batch_size, self.mixing = cutmix, epoch, batch_size, mixing

    def __call__(self, info):
        if not self.mixing:
            return np.zeros((self.batch_size, 4), np.float32)
        return self.cutmix.boxes(self.epoch, info.iteration, self.batch_size)


def _bounded_iterator(base):
    """``base`` (DALI's iterator class) that schedules no pipeline run past the pass's last batch.

    DALI's iterators keep ``prefetch_queue_depth`` runs scheduled ahead of the batch handed out; the
    reader then wraps into its next epoch, so a pass that stops after its batches and drops its
    pipeline (each epoch here has its own) would throw that many decoded batches away: 25 % of the
    work on epochs of 8 batches. The count of scheduled runs never falls below what was asked for
    (the first schedule counts as ``prefetch`` runs), so no batch that the pass takes is left unscheduled.
    """
    from nvidia.dali import types

    class BoundedIterator(base):
        def __init__(self, pipes, output_map, runs: int, prefetch: int, **kwargs):
            self._runs_left, self._prefetch = runs, max(1, int(prefetch))
            super().__init__(pipes, output_map, **kwargs)

        def _schedule_runs(self, release_outputs=True):
            if self._runs_left > 0:
                self._runs_left -= 1 if self._ever_scheduled else self._prefetch
                return super()._schedule_runs(release_outputs)
            if release_outputs:  # what the base does before scheduling, without the run
                for pipe in self._pipes:
                    with pipe._check_api_type_scope(types.PipelineAPIType.ITERATOR):
                        pipe.release_outputs()

    return BoundedIterator


def _drop_iterator(iterator) -> None:
    """Release a pipeline built for a pass that never came."""
    for pipe in getattr(iterator, "_pipes", ()):
        shutdown_pipeline(pipe)


class UnknownOrderError(DaliRelabelError, TypeError):
    """The rows of a shard epoch are not known before it is read."""


class _ShardBatches(LoaderState):
    """Passes over shard pipelines, one pipeline per pass, on a :class:`LoaderState` (the position
    inside an epoch is DALI's checkpoint of the reader)."""

    keeps_checkpoints = True

    def __init__(self, shards, batch_size: int, config: DataConfig, device, device_id, rank, world_size,
                 last_batch: str):
        from .ops.plugin import load_plugin

        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.load(shards)
        self.config = config
        self.device = resolve_device(device)
        self.device_id = device_index(device, device_id)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.batch_size = batch_size
        self.drop_last = last_batch == "drop"
        counts = rank_samples(self.shards.num_samples, self.world_size)
        # Every rank yields the same number of batches (DDP needs it): the shards are padded to the
        # largest part, and with "drop" the smallest part decides.
        batches_per_epoch = min(counts) // batch_size if self.drop_last else -(-max(counts) // batch_size)
        if batches_per_epoch == 0:
            raise ValueError(f"{self.shards.num_samples} samples over {self.world_size} ranks do not fill one "
                             f"batch of {batch_size}")
        super().__init__(batches_per_epoch)
        self.class_names = self.shards.class_names
        self.num_classes = self.shards.num_classes
        self.dataset = LoaderDataset(self.shards.directory, self.class_names, self.shards.num_samples)
        self._ahead: Optional[PipelineAhead] = None  # the next pass's pipeline, built while a pass ends
        self._pace = Pace(config.prefetch_queue_depth)  # when to start building it
        load_plugin()

    # -- what the position needs ------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        return rank_samples(self.shards.num_samples, self.world_size)[self.rank]

    def epoch_rows(self, epoch: int) -> List[int]:
        raise UnknownOrderError("the rows of a shard epoch are known only as its batches stream in (DALI's "
                                "reader shuffles them in a buffer): iterate the loader with return_rows=True")

    def _fingerprint(self) -> dict:
        return {"batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "seed": self.config.seed, "num_samples": self.shards.num_samples,
                "store_sha256": self.shards.store_sha256, "last_batch": "drop" if self.drop_last else "pad"}

    def _pass_checkpoint(self, current: Pass) -> Optional[str]:
        checkpoint = current.iterator.checkpoints()[0]  # DALI's serialised (binary) protobuf
        return base64.b64encode(checkpoint if isinstance(checkpoint, bytes)
                                else checkpoint.encode("latin-1")).decode("ascii")

    # -- passes ------------------------------------------------------------------------------------
    def _pipeline_kwargs(self) -> dict:
        from .pipelines.graphs import pipeline_kwargs

        return pipeline_kwargs(self.config, self.batch_size, self.device_id, checkpointing=True)

    @abc.abstractmethod
    def _build(self, epoch: int, checkpoint: Optional[bytes], mixing: bool):
        """The pipeline (not yet built) of a pass over ``epoch``, restored from DALI's ``checkpoint``."""

    def _iterator(self, epoch: int, first: int, checkpoint: Optional[str], mixing: bool, schedule: bool = False):
        """The iterator of a new pipeline for a pass over ``epoch`` from batch ``first`` (DALI's
        ``checkpoint`` of that position, base64); ``schedule``: its first runs start now."""
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = self._build(epoch, base64.b64decode(checkpoint) if checkpoint else None, mixing)
        pipe.build()
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        iterator = _bounded_iterator(DALIGenericIterator)(
            [pipe], self.output_map, runs=self.batches_per_epoch - first, prefetch=self.config.prefetch_queue_depth,
            reader_name="Reader", last_batch_policy=policy, auto_reset=False, prepare_first_batch=False)
        if schedule:
            iterator._schedule_runs(False)  # what its first next() would do (BoundedIterator counts it)
        return iterator

    def _take_iterator(self, current: Pass):
        """``(iterator, built now)`` of the pass ``current``: the one built ahead for it, else a new one."""
        ahead, self._ahead = self._ahead, None
        key = (current.epoch, current.first, current.checkpoint, current.mixing)
        made = ahead.take(key) if ahead is not None else None
        return (made, False) if made is not None else (self._iterator(*key), True)

    def _build_ahead(self, current: Pass) -> None:
        """Start building, on a helper thread, the pipeline of the pass that follows ``current``
        unless ``set_epoch`` or ``load_state_dict`` say otherwise: the next epoch from its start."""
        key = (current.epoch + 1, 0, None, current.mixing)
        self._ahead = PipelineAhead(key, lambda: self._iterator(*key, schedule=True), _drop_iterator)

    def close(self) -> None:
        """Release the pipeline built ahead for the next pass (the running pass's goes with it)."""
        self._pass = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.drop()

    def _passes(self, mixing: bool = True):
        current = self._next_pass(mixing)
        epoch, first = current.epoch, current.first
        self._pace.pass_started()
        current.iterator, built_now = self._take_iterator(current)
        self._pace.pipeline_taken(built_now)
        try:
            for outputs in current.iterator:
                if self._pass is not current:
                    raise superseded(current)  # a newer pass took over: never end this one silently
                current.consumed += 1
                self._pace.batch_taken()
                left = self.batches_per_epoch - (first + current.consumed)
                if self._ahead is None and 0 < left <= self._pace.batches_ahead():
                    self._build_ahead(current)
                yield epoch, first + current.consumed - 1, outputs[0]
                if first + current.consumed >= self.batches_per_epoch:
                    break  # every rank stops after the same number of batches
        finally:
            if self._pass is current and first + current.consumed >= self.batches_per_epoch:
                current.finished = True
                self._pass = None


class ShardReLabelLoader(_ShardBatches):
    """Training batches ``(images, soft_targets)`` from tar shards.

    Args:
        shards: a :class:`ShardSet`, the shard directory, its ``index.json``, or a brace pattern
            (``DIR/shard-{000000..000127}.tar``).
        batch_size, config, device, device_id, rank, world_size, return_labels, return_rows, return_geometry: as
            :class:`~dali_relabel.loader.ReLabelLoader`.
        shuffle: a new shard order each epoch and a shuffled sample buffer (else the stored order).

    Behaves like :class:`~dali_relabel.loader.ReLabelLoader` (``len``, passes, ``set_epoch``,
    ``sampler.set_epoch``, ``state_dict``/``load_state_dict``, ``mixup_enabled``); the image of a row
    in an epoch gets the same crop, flip and jitter on both paths.
    """

    def __init__(self, shards, batch_size: int, config: Optional[DataConfig] = None, device="auto",
                 device_id: Optional[int] = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 shuffle: bool = True, return_labels: bool = False, return_rows: bool = False,
                 return_geometry: bool = False):
        config = config or DataConfig()
        super().__init__(shards, batch_size, config, device, device_id, rank, world_size, config.last_batch)
        if not self.shards.has_maps:
            raise ValueError(f"the shards in {self.shards.directory} hold no label maps (written without a "
                             "store): train on the image tree for hard-label targets")
        if self.device == "gpu":
            from .ops.plugin import require_gpu_backend

            require_gpu_backend()
        if config.aug_repeats > 1:
            raise ValueError(f"aug_repeats {config.aug_repeats} (timm's --aug-repeats, torchvision's --ra-reps): "
                             "repeated augmentation needs the image tree loader (ReLabelLoader); DALI's tar "
                             "reader streams each sample once per epoch")
        self.num_classes = config.target_width(self.shards.num_classes)
        self.layout = config.layout or self.shards.layout
        self.shuffle = shuffle
        self.return_labels, self.return_rows, self.return_geometry = return_labels, return_rows, return_geometry
        self.mixup_enabled = True
        self.cutmix = None
        if config.cutmix_probability > 0:
            self.cutmix = CutMixSpec(config.cutmix_probability, config.cutmix_alpha, config.image_size,
                                     seed=config.seed, stop_epoch=config.cutmix_stop_epoch,
                                     per_batch=config.mix_granularity == "batch")
        from .pipelines.graphs import shard_train_outputs

        self.output_map = shard_train_outputs(config, self.cutmix is not None, return_geometry)

    def shard_order(self, epoch: int) -> List[str]:
        """The shards' order in ``epoch`` (the same on every rank)."""
        names = [s["name"] for s in self.shards.shards]
        if not self.shuffle:
            return names
        return [names[i] for i in np.random.default_rng([self.config.seed, epoch, 0x5EED]).permutation(len(names))]

    def _build(self, epoch: int, checkpoint: Optional[bytes], mixing: bool):
        from .pipelines.graphs import shard_train_pipeline

        boxes = None if self.cutmix is None else _BoxSource(self.cutmix, epoch, self.batch_size, mixing)
        reader_seed = int(np.random.default_rng([self.config.seed, epoch, self.rank, 0x5EED]).integers(2**31))
        return shard_train_pipeline(self.shards, self.shard_order(epoch), epoch, self.config, self.shards.num_classes,
                                    self.layout, decoder_device="mixed" if self.device == "gpu" else "cpu",
                                    shard_id=self.rank, num_shards=self.world_size, shuffle=self.shuffle,
                                    reader_seed=reader_seed, mix_boxes=boxes, geometry=self.return_geometry,
                                    checkpoint=checkpoint,
                                    **self._pipeline_kwargs())

    def __iter__(self):
        for epoch, index, batch in self._passes(self.mixup_enabled):
            batch = mix_batch(batch, self.config, epoch, index, self.mixup_enabled)
            yield training_batch(batch, self.config, self.return_labels, self.return_rows, self.return_geometry)


class ShardValidationLoader(_ShardBatches):
    """Validation batches ``(images, labels)`` from tar shards (with or without maps), every sample
    exactly once per pass over all ranks (DALI pads each rank's part; the padding is dropped). Shards
    of a tree written without a store keep its file list: ``images.relpaths`` aligns ReaL labels."""

    def __init__(self, shards, batch_size: int, config: Optional[DataConfig] = None, device="auto",
                 device_id: Optional[int] = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 return_rows: bool = False):
        from .pipelines.graphs import SHARD_VALIDATION_OUTPUTS

        super().__init__(shards, batch_size, config or DataConfig(), device, device_id, rank, world_size, "pad")
        self.output_map = list(SHARD_VALIDATION_OUTPUTS)
        self.return_rows = return_rows
        if self.shards.relpaths is not None:  # the tree's file list: ReaL labels are aligned by it
            from .imagefolder import ImageList

            self.images = ImageList(self.shards.directory, self.class_names, self.shards.relpaths, [])

    def _build(self, epoch: int, checkpoint: Optional[bytes], mixing: bool):
        from .pipelines.graphs import shard_validation_pipeline

        return shard_validation_pipeline(self.shards, self.config,
                                         decoder_device="mixed" if self.device == "gpu" else "cpu",
                                         shard_id=self.rank, num_shards=self.world_size, checkpoint=checkpoint,
                                         **self._pipeline_kwargs())

    def __iter__(self):
        for _, _, batch in self._passes():
            yield validation_batch(batch, self.config, self.return_rows)


def is_shard_location(location) -> bool:
    """Whether ``location`` names shards (a directory with ``index.json``, the index, a ``.tar`` or
    brace pattern) rather than an image tree."""
    location = os.fspath(location)
    return (location.endswith((".json", ".tar")) or "{" in location
            or os.path.exists(os.path.join(location, "index.json")))
