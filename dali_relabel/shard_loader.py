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
elsewhere (``set_epoch`` to another epoch, ``load_state_dict`` inside an epoch, ``mixup_enabled``
changed) drops it and builds its own.

**Resume.** A state (``state_dict``) holds the rows the rank yielded in the epoch (``seen``) and DALI's
checkpoint of its reader. What is guaranteed:

* with the saved world size and batch size (the rank's own state, or :func:`merge_states` of every
  rank's): DALI restores the reader, and the pass continues exactly where the interrupted one stopped
  (the same samples in the same batches, the same targets);
* with another world size or batch size, from :func:`merge_states` of *every* rank's states (what
  ``pipelines/train.py`` checkpoints): the pass reads exactly the epoch's samples that no rank yielded
  yet, each once (with ``last_batch="pad"``: all of them; with ``"drop"``: all but less than a batch
  per rank), every one with the crop, flip and target it had in the uninterrupted epoch (those are
  keyed by seed, epoch and row). It reads the epoch's shards in the same order, through DALI index
  files that list only the unread samples, dealt to the new ranks in contiguous parts and shuffled in
  the buffer again: which batch a sample lands in differs from the uninterrupted run (and so do
  its CutMix/Mixup partners);
* one rank's state alone cannot continue on another shape (the other ranks' rows are unknown): it
  is refused with :class:`~dali_relabel.loader_state.ResumeError`.

**Damaged shards.** Every pass checks the shards it reads before DALI sees them (present, of their
recorded size, sound DALI indexes; on object storage through one listing), and a read that fails
mid-pass is explained: by default a :class:`~dali_relabel.shards.ShardError` names the shard. With
``skip_bad_shards=True``:

* a shard found damaged when a pass starts is left out of that pass (a warning names it, and
  :attr:`~_ShardBatches.skipped_shards` counts it). Every rank checks *every* shard of the epoch, so
  ranks that see the same files leave out the same shards and yield the same, smaller number of
  batches (the pass reads the other shards as a resumed pass reads its unread samples). Ranks that
  saw different files (a shard damaged while they started) would yield different numbers of batches,
  and DDP would wait at the next collective until its timeout; a restart with ``--resume`` checks
  again, on every rank alike. Each pass checks again: a repaired shard is read again;
* a shard that fails while a pass reads it (damaged after the pass's check) is found (sizes, indexes,
  local shards' content hashes), named, counted and left out, and on one rank the pass goes on over
  the samples it has not yielded yet, from the other shards: none twice, none of them lost. On
  several ranks it raises the :class:`~dali_relabel.shards.ShardError` instead: only the ranks that
  read that shard see the failure, and going on would leave them with fewer batches than the others
  (DDP would hang). The run's last checkpoint resumes it (``--resume``), and that pass leaves the
  shard out on every rank;
* a pass that left shards out keeps no DALI checkpoint: its state resumes from the rows yielded
  (from one rank's own state only with one rank, like a resume on another shape), and the resumed
  pass checks the shards again.
"""
from __future__ import annotations

import abc
import base64
import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import DataConfig, data_fingerprint
from .devices import device_index, resolve_device
from .distributed import resolve_rank
from .errors import DaliRelabelError
from .loader import flatten_crops, mix_batch, training_batch, validation_batch
from .loader_state import (RESTART_HINT, LoaderDataset, LoaderState, Pass, ResumeError, Start, pack_rows,
                           unpack_rows)
from .lookahead import Pace, PipelineAhead
from .mixing import CutMixSpec
from .regions import check_region_settings, region_targets
from .shards import ShardError, ShardSet
from .sources import crop_boxes
from .watchdog import shutdown_pipeline


def rank_samples(num_samples: int, world_size: int) -> List[int]:
    """Samples of each rank under DALI's sharding: ``floor((r + 1) N / S) - floor(r N / S)``."""
    return [(r + 1) * num_samples // world_size - r * num_samples // world_size for r in range(world_size)]


class _BoxSource:
    """CutMix boxes per batch for the shard graph, keyed like the tree path's (``BatchInfo``):
    ``[images, 4]``, or ``[images, crops, 4]`` with several crops per image
    (:func:`~dali_relabel.sources.crop_boxes`)."""

    def __init__(self, cutmix: CutMixSpec, epoch: int, images: int, mixing: bool, crops: int = 1):
        self.cutmix, self.epoch, self.images, self.mixing, self.crops = cutmix, epoch, images, mixing, crops

    def __call__(self, info):
        return crop_boxes(self.cutmix, self.epoch, info.iteration, self.images, self.crops, self.mixing)


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


def unread_index(index_path: str, seen: np.ndarray, out_path: str) -> int:
    """Write to ``out_path`` the DALI index file ``index_path`` with only the samples whose row
    ``seen`` does not mark; returns how many it lists (nothing is written for none). Run once per
    shard when a pass resumes on another shape, never per batch."""
    with open(index_path) as f:
        header, *lines = f.read().splitlines()
    kept = [line for line in lines if line and not seen[int(line.split(" ", 4)[3].split(".", 1)[0])]]
    if kept:
        with open(out_path, "w") as f:
            f.write(f"{header.split()[0]} {len(kept)}\n" + "\n".join(kept) + "\n")
    return len(kept)


class _ShardBatches(LoaderState):
    """Passes over shard pipelines, one pipeline per pass, on a :class:`LoaderState`: the position
    inside an epoch is the rows each rank yielded (``seen``) and DALI's checkpoint of the reader (see
    the module's docstring for what a resume guarantees)."""

    keeps_checkpoints = True

    def __init__(self, shards, batch_size: int, config: DataConfig, device, device_id, rank, world_size,
                 last_batch: str, crops_per_image: int = 1, skip_bad_shards: bool = False):
        from .ops.plugin import load_plugin

        self.skip_bad_shards = bool(skip_bad_shards)
        #: ``{shard name: {"passes", "samples", "problem"}}``: the shards left out (``skip_bad_shards``),
        #: in how many passes, the samples those passes did not yield, the last problem found.
        self.skipped_shards: Dict[str, dict] = {}
        # skipping: a shard damaged now is left out by the passes, not refused here
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.load(shards, check_sizes=not skip_bad_shards)
        if skip_bad_shards:  # plain reads: a local shard truncated mid-pass raises instead of SIGBUS
            self.shards = copy.copy(self.shards)
            self.shards.map_local_files = False
        self._left_out = set(self.shards.damaged_shards()) if skip_bad_shards else set()  # found by the last check
        self._shard_rows: Dict[str, np.ndarray] = {}
        self._rank_rows_start: Optional[Start] = None  # a resumed start whose rows are this rank's alone
        self.config = config
        self.device = resolve_device(device)
        self.device_id = device_index(device, device_id)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.batch_size = batch_size  # samples (crops) of a batch
        self.crops_per_image = crops_per_image
        self.images_per_batch = config.replace(crops_per_image=crops_per_image).images_per_batch(batch_size)
        self.drop_last = last_batch == "drop"
        counts = rank_samples(self.shards.num_samples, self.world_size)
        # Every rank yields the same number of batches (DDP needs it): the shards are padded to the
        # largest part, and with "drop" the smallest part decides.
        images = self.images_per_batch
        batches_per_epoch = min(counts) // images if self.drop_last else -(-max(counts) // images)
        if batches_per_epoch == 0:
            raise ValueError(f"{self.shards.num_samples} samples over {self.world_size} ranks do not fill one "
                             f"batch of {images} images")
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
        return rank_samples(self.shards.num_samples, self.world_size)[self.rank] * self.crops_per_image

    def _batches_of(self, samples: int) -> int:
        """Batches every rank yields of ``samples`` (images) dealt by DALI's sharding."""
        counts = rank_samples(samples, self.world_size)
        images = self.images_per_batch
        return min(counts) // images if self.drop_last else -(-max(counts) // images)

    # -- the global position: the rows yielded --------------------------------------------------------
    @staticmethod
    def _elastic(start: Start) -> bool:
        """A pass that reads the unread samples of its epoch (not DALI's checkpoint)."""
        return start.checkpoint is None and start.seen is not None and bool(start.seen.any())

    def _pass_batches(self, start: Start) -> int:
        if self._left_out:  # as the last check found the shards: the others' unread samples
            kept = [s["name"] for s in self.shards.shards if s["name"] not in self._left_out]
            return self._batches_of(self._unread_count(kept, start.seen))
        if self._elastic(start):
            return self._batches_of(self.shards.num_samples - int(start.seen.sum()))
        return self.batches_per_epoch - start.batch

    def _start_after(self, current: Pass) -> Start:
        return Start(current.first + current.consumed, int(current.seen.sum()), seen=current.seen.copy())

    def _state_extra(self, start: Start) -> dict:
        if start.seen is None:
            return {"seen": None, "seen_ranks": None, "num_samples": self.shards.num_samples}
        return {"seen": pack_rows(start.seen), "seen_ranks": [self.rank], "num_samples": self.shards.num_samples}

    def _resume_start(self, state: dict, same_shape: bool) -> Start:
        """DALI's checkpoint of this rank with the same shape; else the epoch's unread samples, which
        needs every rank's rows (:func:`~dali_relabel.loader_state.merge_states`)."""
        seen = None if state.get("seen") is None else unpack_rows(state["seen"], self.shards.num_samples)
        batch = int(state["batch"])
        if same_shape:
            try:
                start = super()._resume_start(state, same_shape)
                start = Start(start.batch, int(state.get("position") or 0), checkpoint=start.checkpoint, seen=seen)
                if sorted(state.get("seen_ranks") or ()) != list(range(self.world_size)):
                    self._rank_rows_start = start  # no other rank's rows: left-out shards cannot be read around
                return start
            except ResumeError:
                if seen is None:
                    raise
        world = int(state.get("world_size") or 0)
        if seen is None or sorted(state.get("seen_ranks") or ()) != list(range(world)):
            raise ResumeError(f"cannot continue batch {batch} of epoch {state['epoch']} with world size "
                              f"{self.world_size} and batch size {self.batch_size}: the state holds the rows of "
                              f"ranks {state.get('seen_ranks')} of the {world} that saved it; merge every rank's "
                              f"state_dict() with merge_states (train.py checkpoints do), or {RESTART_HINT}")
        return Start(int(seen.sum()) // (self.images_per_batch * self.world_size), int(seen.sum()), seen=seen)

    def _pass_checkpoint(self, current: Pass) -> Optional[str]:
        if self._elastic(current.start) or current.left_out:
            return None  # its pipeline reads temporary index files or not every shard: resume it from the rows
        return self._reader_checkpoint(current)

    def _unread_shards(self, names: Sequence[str], seen: np.ndarray) -> Tuple[List[str], List[str]]:
        """``(names, index paths)`` of the shards (in ``names``' order) with unread samples, through
        index files that list only those (in a directory of this loader's, removed with it)."""
        if getattr(self, "_index_dir", None) is None:
            self._index_dir = tempfile.mkdtemp(prefix="dali_relabel_unread_")
            self._index_finalizer = weakref.finalize(self, shutil.rmtree, self._index_dir, True)
        for old in os.listdir(self._index_dir):
            os.unlink(os.path.join(self._index_dir, old))
        kept, paths = [], []
        for name in names:
            out = os.path.join(self._index_dir, name[:-len(".tar")] + ".idx")
            if unread_index(self.shards.reader_index_path(name), seen, out):  # remote: the cached copy
                kept.append(name)
                paths.append(out)
        return kept, paths

    def _rows_of(self, name: str) -> np.ndarray:
        """The rows shard ``name`` holds, from its DALI index (read once; checked by the pass first)."""
        if name not in self._shard_rows:
            with open(self.shards.reader_index_path(name)) as f:
                lines = f.read().splitlines()[1:]
            self._shard_rows[name] = np.array([int(line.split(" ", 4)[3].split(".", 1)[0]) for line in lines if line],
                                              np.int64)
        return self._shard_rows[name]

    def _unread_count(self, names: Sequence[str], seen: Optional[np.ndarray]) -> int:
        """Samples of the shards ``names`` that ``seen`` does not mark."""
        if seen is None or not seen.any():
            samples = {s["name"]: s["samples"] for s in self.shards.shards}
            return sum(samples[name] for name in names)
        return sum(int((~seen[self._rows_of(name)]).sum()) for name in names)

    def _leave_out(self, current: Pass, damaged: Dict[str, str], when: str) -> None:
        """Leave the ``damaged`` shards (``{name: problem}``) out of the pass ``current``: warn, count."""
        current.left_out |= set(damaged)
        self._left_out |= set(damaged)
        for name, problem in damaged.items():
            try:
                lost = self._unread_count([name], current.seen)
            except (OSError, ValueError, IndexError):  # its DALI index is the damage: count the whole shard
                lost = next(s["samples"] for s in self.shards.shards if s["name"] == name)
            count = self.skipped_shards.setdefault(name, {"passes": 0, "samples": 0, "problem": ""})
            count["passes"] += 1
            count["samples"] += lost
            count["problem"] = problem
            warnings.warn(f"{problem} [skip_bad_shards: left out of the pass over epoch {current.epoch} {when}, "
                          f"{lost} samples not read]", RuntimeWarning, stacklevel=3)

    def _check_pass_shards(self, current: Pass) -> List[str]:
        """Check the shards of the pass ``current`` before DALI reads them; returns this rank's.
        Without ``skip_bad_shards`` a damaged one is refused; with it every shard of the epoch is
        checked (on every rank alike) and the damaged ones are left out of the pass (its batches
        are counted again)."""
        if not self.skip_bad_shards:
            reading = self._pass_shards(current.epoch)
            self.shards.check_files("header", reading)  # DALI trusts the indexes: checked before each pass
            return reading
        from .shard_checks import shards_of_rank

        order = self._epoch_shards(current.epoch)
        damaged = self.shards.damaged_shards(order)
        self._left_out = set(damaged)
        current.total = self._pass_batches(current.start)  # the shards as found now (len() knew the last check)
        if damaged:
            start = current.start
            if start.checkpoint is not None and (start.seen is None or (
                    self.world_size > 1 and start is self._rank_rows_start)):
                name = next(iter(damaged))
                raise ShardError(f"{damaged[name]} (skip_bad_shards cannot leave it out of a pass resumed from "
                                 "this rank's own DALI checkpoint: the other ranks' rows are unknown; resume from "
                                 "merge_states of every rank's state, as train.py checkpoints)")
            self._leave_out(current, damaged, "at its start")
            kept = [name for name in order if name not in damaged]
            current.checkpoint = None  # DALI's checkpoint is of a reader over every shard: go by the rows
            return shards_of_rank(self.shards.shards, kept, self.rank, self.world_size)
        return shards_of_rank(self.shards.shards, order, self.rank, self.world_size)

    def _skip_failed_shard(self, current: Pass, reading: Sequence[str], error: RuntimeError) -> None:
        """DALI failed mid-pass with ``skip_bad_shards``: leave the damaged shard out and go on over
        the samples not yet yielded (one rank), or raise naming it (see the module's docstring)."""
        damaged = self.shards.damaged_shards([name for name in reading if name not in current.left_out], deep=True)
        if not damaged:
            raise error  # no shard differs from what was written: explained as without skipping
        if self.world_size > 1:
            name = next(iter(damaged))
            raise ShardError(f"{damaged[name]} (damaged during the pass over epoch {current.epoch}: skip_bad_shards "
                             f"would leave rank {self.rank} with fewer batches than the other ranks; resume from "
                             "the last checkpoint, whose first pass leaves it out on every rank)") from error
        for pipe in current.iterator._pipes:
            shutdown_pipeline(pipe)
        current.iterator = None
        self._leave_out(current, damaged, "while reading it")
        kept = [name for name in self._epoch_shards(current.epoch) if name not in current.left_out]
        current.total = current.consumed + self._batches_of(self._unread_count(kept, current.seen))
        if current.total > current.consumed:
            current.iterator = self._iterator(current.epoch, current.first + current.consumed, None, current.mixing,
                                              unread=self._unread_shards(kept, current.seen),
                                              runs=current.total - current.consumed)

    def _dataset_sha256(self) -> str:
        """The shard set's identity: the store it was made from and every shard's name, count and size."""
        listing = [self.shards.store_sha256, [(s["name"], s["samples"], s["bytes"]) for s in self.shards.shards]]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def epoch_rows(self, epoch: int) -> List[int]:
        raise UnknownOrderError("the rows of a shard epoch are known only as its batches stream in (DALI's "
                                "reader shuffles them in a buffer): iterate the loader with return_rows=True")

    def _fingerprint(self) -> dict:
        """The order's settings (seed, shuffle, the shard set) and the data's (the store's content
        hash, layout, targets, :func:`~dali_relabel.config.data_fingerprint`)."""
        return {"seed": self.config.seed, "shuffle": getattr(self, "shuffle", False),
                "num_samples": self.shards.num_samples, "store_sha256": self.shards.store_sha256,
                "data": self._data_fingerprint()}

    def _data_fingerprint(self) -> dict:
        return {**data_fingerprint(self.config), "dataset": self._dataset_sha256()}

    def _reader_checkpoint(self, current: Pass) -> Optional[str]:
        checkpoint = current.iterator.checkpoints()[0]  # DALI's serialised (binary) protobuf
        return base64.b64encode(checkpoint if isinstance(checkpoint, bytes)
                                else checkpoint.encode("latin-1")).decode("ascii")

    # -- passes ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the running pass's pipeline now and release the one built ahead for the next pass
        (the next ``iter()`` builds its own)."""
        current, self._pass = self._pass, None
        ahead, self._ahead = self._ahead, None
        if self._built_in != os.getpid():
            return  # a forked child: the pipelines (and the helper thread) stayed with the parent
        if current is not None and current.iterator is not None:
            for pipe in current.iterator._pipes:
                shutdown_pipeline(pipe)
            current.iterator = None
        if ahead is not None:
            ahead.drop()

    def _pipeline_kwargs(self) -> dict:
        from .pipelines.graphs import pipeline_kwargs

        return pipeline_kwargs(self.config, self.images_per_batch, self.device_id, checkpointing=True)

    def _pass_shards(self, epoch: int) -> List[str]:
        """The shards this rank reads in a pass over ``epoch``."""
        from .shard_checks import shards_of_rank

        return shards_of_rank(self.shards.shards, self._epoch_shards(epoch), self.rank, self.world_size)

    @abc.abstractmethod
    def _build(self, epoch: int, checkpoint: Optional[bytes], mixing: bool, unread=None):
        """The pipeline (not yet built) of a pass over ``epoch``, restored from DALI's ``checkpoint``,
        or reading only the samples ``unread`` lists (``(names, index paths)`` of a resumed pass)."""

    def _iterator(self, epoch: int, first: int, checkpoint: Optional[str], mixing: bool, schedule: bool = False,
                  unread=None, runs: Optional[int] = None):
        """The iterator of a new pipeline for a pass over ``epoch`` from batch ``first`` (DALI's
        ``checkpoint`` of that position, base64; or ``unread``, the ``(names, index paths)`` of a
        resumed pass, :meth:`_build`) that yields ``runs`` batches (default: the rest of the epoch);
        ``schedule``: its first runs start now."""
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = self._build(epoch, base64.b64decode(checkpoint) if checkpoint else None, mixing, unread)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        pipe.build()
        iterator = _bounded_iterator(DALIGenericIterator)(
            [pipe], self.output_map, runs=self.batches_per_epoch - first if runs is None else runs,
            prefetch=self.config.prefetch_queue_depth, reader_name="Reader", last_batch_policy=policy,
            auto_reset=False, prepare_first_batch=False)
        if schedule:
            iterator._schedule_runs(False)  # what its first next() would do (BoundedIterator counts it)
        return iterator

    def _take_iterator(self, current: Pass):
        """``(iterator, built now)`` of the pass ``current``: the one built ahead for it (a pass from
        the start of its epoch), else a new one."""
        ahead, self._ahead = self._ahead, None
        key = (current.epoch, current.first, current.checkpoint, current.mixing)
        left_out = current.left_out
        if ahead is not None:
            made = ahead.take(key if current.start.at_epoch_start and not left_out else object())
            if made is not None:
                return made, False
        unread = None
        if left_out:  # every shard but those, or their unread samples
            kept = [name for name in self._epoch_shards(current.epoch) if name not in left_out]
            unread = self._unread_shards(kept, current.seen) if current.seen.any() else \
                (kept, [self.shards.reader_index_path(name) for name in kept])
        elif self._elastic(current.start):
            unread = self._unread_shards(self._epoch_shards(current.epoch), current.seen)
        return self._iterator(*key, unread=unread, runs=current.total), True

    def _build_ahead(self, current: Pass) -> None:
        """Start building, on a helper thread, the pipeline of the pass that follows ``current``
        unless ``set_epoch`` or ``load_state_dict`` say otherwise: the next epoch from its start
        (its shards checked first, as every pass's are)."""
        key = (current.epoch + 1, 0, None, current.mixing)

        def build():
            self.shards.check_files("header", self._pass_shards(key[0]))  # DALI trusts the indexes
            return self._iterator(*key, schedule=True)

        self._ahead = PipelineAhead(key, build, _drop_iterator)

    def _passes(self, mixing: bool = True):
        current = self._next_pass(mixing)
        epoch, first = current.epoch, current.first
        seen = current.start.seen
        current.seen = seen.copy() if seen is not None else np.zeros(self.shards.num_samples, bool)
        reading = self._check_pass_shards(current)
        if current.total <= 0:
            current.finished, self._pass = True, None
            return
        self._pace.pass_started()
        try:
            current.iterator, built_now = self._take_iterator(current)
            self._pace.pipeline_taken(built_now)
            while True:
                if not self._still_running(current):
                    return
                try:
                    outputs = next(current.iterator)
                except StopIteration:
                    break
                except RuntimeError as error:
                    if not self.skip_bad_shards:
                        raise
                    self._skip_failed_shard(current, reading, error)  # or raises, naming the shard
                    if current.iterator is None:
                        break  # nothing of the pass left to read
                    continue
                current.consumed += 1
                current.seen[outputs[0]["rows"].reshape(-1).cpu().numpy()] = True  # once per batch
                self._pace.batch_taken()
                left = current.total - current.consumed
                if self._ahead is None and 0 < left <= self._pace.batches_ahead():
                    self._build_ahead(current)
                yield epoch, first + current.consumed - 1, outputs[0]
                if current.consumed >= current.total:
                    break  # every rank stops after the same number of batches
        except RuntimeError as error:
            self._explain_read_failure(error)  # a shard changed (or vanished) under the run
            raise self.shards.explain_failure(reading, error) from error  # which shard and sample key
        finally:
            if self._pass is current and current.consumed >= current.total:
                current.finished = True
                self._pass = None
            if current.finished or self._pass is not current:
                current.iterator = None  # the pass's pipeline goes now, not when the generator is collected

    def _end_pass(self) -> None:
        """Stop the running pass (if any): its pipeline is dropped (the next pass builds its own)."""
        current, self._pass = self._pass, None
        if current is not None:
            current.iterator = None

    def _epoch_shards(self, epoch: int) -> List[str]:
        """Every shard in the order a pass over ``epoch`` reads them."""
        return [s["name"] for s in self.shards.shards]

    def _explain_read_failure(self, error: RuntimeError) -> None:
        """DALI failed to read or build: if a shard changed since the loader checked it (truncated,
        replaced or removed, on a disk or on object storage), raise :class:`ShardError` naming it."""
        from .shards import ShardError

        try:
            self.shards.check_sizes()
        except (ShardError, OSError) as problem:
            raise ShardError(f"reading the shards failed: {problem} (DALI: {_last_line(error)})") from error


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


class ShardReLabelLoader(_ShardBatches):
    """Training batches ``(images, soft_targets)`` from tar shards.

    Args:
        shards: a :class:`ShardSet`, the shard directory, its ``index.json``, or a brace pattern
            (``DIR/shard-{000000..000127}.tar``).
        batch_size, config, device, device_id, rank, world_size, return_labels, return_rows, return_geometry: as
            :class:`~dali_relabel.loader.ReLabelLoader`.
        shuffle: a new shard order each epoch and a shuffled sample buffer (else the stored order).
        skip_bad_shards: leave a shard found damaged (missing, truncated, a bad DALI index; when a
            pass starts or while it reads it) out of the pass, with a warning naming it, counted in
            :attr:`skipped_shards`, instead of raising :class:`~dali_relabel.shards.ShardError`
            (see the module's docstring for the ranks).

    Behaves like :class:`~dali_relabel.loader.ReLabelLoader` (``len``, passes, ``set_epoch``,
    ``sampler.set_epoch``, ``state_dict``/``load_state_dict``, ``mixup_enabled``); the image of a row
    in an epoch gets the same crop, flip and jitter on both paths, and with
    ``config.crops_per_image`` k the same k crops (batches of ``batch_size / k`` images x k crops;
    the reader and its checkpoints count images).
    """

    def __init__(self, shards, batch_size: int, config: Optional[DataConfig] = None, device="auto",
                 device_id: Optional[int] = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 shuffle: bool = True, return_labels: bool = False, return_rows: bool = False,
                 return_geometry: bool = False, skip_bad_shards: bool = False):
        config = config or DataConfig()
        super().__init__(shards, batch_size, config, device, device_id, rank, world_size, config.last_batch,
                         crops_per_image=config.crops_per_image, skip_bad_shards=skip_bad_shards)
        if self.shards.has_regions:  # the tree loader's refusals for a region store
            check_region_settings(config, self.shards, f"the region store's shards in {self.shards.directory}")
        elif not self.shards.has_maps:
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
        self.layout = config.layout or ("HW" if self.shards.has_regions else self.shards.layout)
        self.shuffle = shuffle
        self.return_labels, self.return_rows, self.return_geometry = return_labels, return_rows, return_geometry
        self.mixup_enabled = True
        self.cutmix = None
        if config.cutmix_probability > 0:
            self.cutmix = CutMixSpec(config.cutmix_probability, config.cutmix_alpha, config.image_size,
                                     seed=config.seed, stop_epoch=config.cutmix_stop_epoch,
                                     per_batch=config.mix_granularity == "batch")
        from .pipelines.graphs import shard_train_outputs

        self.output_map = shard_train_outputs(config, self.cutmix is not None, return_geometry, self.shards.has_regions)

    def _epoch_shards(self, epoch: int) -> List[str]:
        return self.shard_order(epoch)

    def shard_order(self, epoch: int) -> List[str]:
        """The shards' order in ``epoch`` (the same on every rank)."""
        names = [s["name"] for s in self.shards.shards]
        if not self.shuffle:
            return names
        return [names[i] for i in np.random.default_rng([self.config.seed, epoch, 0x5EED]).permutation(len(names))]

    def _build(self, epoch: int, checkpoint: Optional[bytes], mixing: bool, unread=None):
        from .pipelines.graphs import shard_train_pipeline

        boxes = None if self.cutmix is None else _BoxSource(self.cutmix, epoch, self.images_per_batch, mixing,
                                                            self.crops_per_image)
        reader_seed = int(np.random.default_rng([self.config.seed, epoch, self.rank, 0x5EED]).integers(2**31))
        names, index_paths = unread or (self.shard_order(epoch), None)
        return shard_train_pipeline(self.shards, names, epoch, self.config, self.shards.num_classes,
                                    self.layout, decoder_device="mixed" if self.device == "gpu" else "cpu",
                                    shard_id=self.rank, num_shards=self.world_size, shuffle=self.shuffle,
                                    reader_seed=reader_seed, mix_boxes=boxes, geometry=self.return_geometry,
                                    checkpoint=checkpoint, index_paths=index_paths, **self._pipeline_kwargs())

    def __iter__(self):
        for epoch, index, batch in self._passes(self.mixup_enabled):
            batch = flatten_crops(batch, self.crops_per_image)
            if self.shards.has_regions:  # the stored top-k labels of the batch's crops, made dense once per batch
                batch = region_targets(batch, self.shards.num_classes, self.shards.label_type)
            batch = mix_batch(batch, self.config, epoch, index, self.mixup_enabled)
            yield training_batch(batch, self.config, self.return_labels, self.return_rows, self.return_geometry)


class ShardValidationLoader(_ShardBatches):
    """Validation batches ``(images, labels)`` from tar shards (with or without maps), every sample
    exactly once per pass over all ranks (DALI pads each rank's part; the padding is dropped). Shards
    of a tree written without a store keep its file list: ``images.relpaths`` aligns ReaL labels.
    ``skip_bad_shards``: as :class:`ShardReLabelLoader`'s (a pass then evaluates fewer samples)."""

    def __init__(self, shards, batch_size: int, config: Optional[DataConfig] = None, device="auto",
                 device_id: Optional[int] = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 return_rows: bool = False, skip_bad_shards: bool = False):
        from .pipelines.graphs import SHARD_VALIDATION_OUTPUTS

        super().__init__(shards, batch_size, config or DataConfig(), device, device_id, rank, world_size, "pad",
                         skip_bad_shards=skip_bad_shards)
        self.output_map = list(SHARD_VALIDATION_OUTPUTS)
        self.return_rows = return_rows
        if self.shards.relpaths is not None:  # the tree's file list: ReaL labels are aligned by it
            from .imagefolder import ImageList

            self.images = ImageList(self.shards.directory, self.class_names, self.shards.relpaths, [])

    def _build(self, epoch: int, checkpoint: Optional[bytes], mixing: bool, unread=None):
        from .pipelines.graphs import shard_validation_pipeline

        names, index_paths = unread or (None, None)
        return shard_validation_pipeline(self.shards, self.config,
                                         decoder_device="mixed" if self.device == "gpu" else "cpu",
                                         shard_id=self.rank, num_shards=self.world_size, checkpoint=checkpoint,
                                         names=names, index_paths=index_paths, **self._pipeline_kwargs())

    def _data_fingerprint(self) -> dict:
        return {**data_fingerprint(self.config, validation=True), "dataset": self._dataset_sha256()}

    def __iter__(self):
        for _, _, batch in self._passes():
            yield validation_batch(batch, self.config, self.return_rows)


def is_shard_location(location) -> bool:
    """Whether ``location`` names shards (a directory with ``index.json``, the index, a ``.tar`` or
    brace pattern) rather than an image tree."""
    from . import remote

    location = os.fspath(location)
    if location.endswith((".json", ".tar")) or "{" in location:
        return True
    if remote.is_remote(location):
        return remote.exists(remote.join(location, "index.json"))
    return os.path.exists(os.path.join(location, "index.json"))
