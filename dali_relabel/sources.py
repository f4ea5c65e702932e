"""The batch data source: one call per batch hands DALI the file paths, label maps and row ids.

:class:`BatchSource` is the callable behind a batch-granular ``fn.external_source``: run in DALI worker
processes (parallel), or in the loader's process with each batch made ahead on a thread
(:class:`~dali_relabel.prefetch.PrefetchingSource`, the default). For
``BatchInfo(iteration, epoch_idx)`` it takes the batch's rows from the rank's :class:`EpochPlan` and
returns, as whole-batch arrays: the image paths (for the plugin's C++ file reader ``relabel.read_files``, or
DALI's ``io.file.read`` for ``s3://`` URLs of a tree on object storage), the
rows' label maps gathered from the memory-mapped store in one read (from a region store: the stored
crops each sample uses this epoch, their whole-pixel windows, flips and top-k labels), the hard
labels, the row ids, a
validity flag, the epoch (which, with the row, keys every random choice: :mod:`dali_relabel.crops`)
and, with CutMix, the pair boxes.
Everything per sample (reading files, decoding, cropping, pooling) happens in DALI's C++. Because the
paths and the maps are gathered for the same rows in the same call, an image can never be paired
with another image's map.

:class:`EpochControl` is a few integers in a shared file through which the loader tells the source
(in whichever process it runs) where each DALI epoch of its pipeline starts (an epoch and a batch),
and where it stops: a stream may run on through the following epochs (:data:`FOREVER`), so the next
pass's first batches are made before the current pass ends (:mod:`dali_relabel.lookahead`). A pass
resumed inside its epoch (:class:`~dali_relabel.loader_state.Start`) reads the rest of the epoch's
global order from its position, dealt to this rank by the plan; the stream then runs on into the
following epochs from their starts.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .bad_images import BadImageError
from .fields import EPOCHS, LABELS, MAP_FIELDS, MIX_BOX, PATHS, REGION_FIELDS, ROWS, SOURCE_FIELDS, Field
from .fields import VALID as VALID_FIELD  # VALID here is the status value
from .lookahead import locate
from .mixing import CutMixSpec
from .paths import PathTable
from .plan import EpochPlan
from .processes import die_with_parent
from .remote import is_remote
from .store import LabelStore, RegionStore, StoreError, map_value_problem, pixel_windows
from .store.region_format import region_value_problem

#: Values of the ``valid`` output.
PADDING, VALID, SKIPPED = 0, 1, 2

#: A stop position no stream reaches: the DALI epoch runs on from epoch to epoch.
FOREVER = 2 ** 62

__all__ = ["BatchSource", "EpochControl", "FOREVER", "PADDING", "VALID", "SKIPPED"]


def _shared_directory() -> str:
    """Where the loader's :class:`EpochControl` files go: ``DALI_RELABEL_SHARED_DIR`` where set (the
    test suite keeps its own), else ``/dev/shm``, else the temp directory."""
    chosen = os.environ.get("DALI_RELABEL_SHARED_DIR")
    if chosen:
        return chosen
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


class EpochControl:
    """Per DALI epoch: ``(epoch, first_batch, stop, mixing, start)``, in a small file mapped by every
    process.

    A DALI epoch reads a stream of positions: its iteration ``i`` is position ``first_batch + i``
    counted from batch 0 of ``epoch``. The positions up to the end of the pass from ``start`` are
    that pass's batches; the ones past it are the following epochs' batches, each epoch read whole
    from its start (:func:`~dali_relabel.lookahead.locate`). The stream ends (``StopIteration``) at
    position ``stop``: the pass's end for one pass, :data:`FOREVER` for a stream that runs on into the
    following epochs.

    The loader writes an epoch's entry before DALI starts that epoch (:meth:`begin`) and may lower its
    stop while it runs (:meth:`stop`); the source reads the entry on every call. Entries live in a
    ring, since at most the running epoch and the next one are in flight. ``mixing`` (0 or 1) switches
    the stream's CutMix boxes on or off (timm's ``loader.mixup_enabled``). ``start`` is where the
    stream's first pass begins in its epoch's global order: ``None`` (the epoch's start) or
    ``(batch, position, unread)`` of a resumed pass (:class:`~dali_relabel.loader_state.Start`), with
    at most ``capacity`` unread positions.
    """

    RING = 4
    _FIXED = 7  # epoch, first, stop, mixing, start batch, position, unread count

    def __init__(self, capacity: int = 64):
        fd, self.path = tempfile.mkstemp(prefix="dali_relabel_control_", dir=_shared_directory())
        os.close(fd)
        self.capacity = int(capacity)
        self._table = np.memmap(self.path, dtype=np.int64, mode="w+", shape=(self.RING, self._FIXED + self.capacity))
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def begin(self, dali_epoch: int, epoch: int, first_batch: int, stop: int, mixing: bool = True,
              start=None) -> None:
        batch, position, unread = (0, 0, ()) if start is None else (start.batch, start.position, start.unread)
        if len(unread) > self.capacity:
            raise ValueError(f"{len(unread)} unread positions do not fit the control's {self.capacity}")
        row = self._table[dali_epoch % self.RING]
        row[self._FIXED:self._FIXED + len(unread)] = unread
        row[:self._FIXED] = (epoch, first_batch, stop, int(mixing), batch, position, len(unread))

    def stop(self, dali_epoch: int, stop: int) -> None:
        """End DALI epoch ``dali_epoch``'s stream at position ``stop`` (counted from batch 0 of its
        epoch)."""
        self._table[dali_epoch % self.RING, 2] = stop

    def entry(self, dali_epoch: int) -> Tuple[int, int, int, bool]:
        epoch, first, stop, mixing = self._table[dali_epoch % self.RING, :4]
        return int(epoch), int(first), int(stop), bool(mixing)

    def start(self, dali_epoch: int) -> Optional[Tuple[int, int, Tuple[int, ...]]]:
        """``(batch, position, unread)`` of the pass's start in its epoch, ``None`` at the epoch's start."""
        row = self._table[dali_epoch % self.RING]
        batch, position, count = (int(v) for v in row[4:self._FIXED])
        if not (batch or position or count):
            return None
        return batch, position, tuple(int(u) for u in row[self._FIXED:self._FIXED + count])

    def close(self) -> None:
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()

    def __getstate__(self):
        return {"path": self.path, "capacity": self.capacity}

    def __setstate__(self, state):
        self.path = state["path"]
        self.capacity = state["capacity"]
        self._table = np.memmap(self.path, dtype=np.int64, mode="r", shape=(self.RING, self._FIXED + self.capacity))
        self._finalizer = None  # only the creating process removes the file


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BatchSource:
    """Callable for a batch-granular ``fn.external_source`` (``batch_info=True``), parallel or wrapped
    in a :class:`~dali_relabel.prefetch.PrefetchingSource`.

    Args:
        image_root: directory (or ``s3://`` prefix) the stored paths are relative to.
        plan: the rank's plan (an :class:`EpochPlan`, or anything with ``batch_size``,
            ``num_batches`` and ``rows(epoch)``).
        control: where each pass starts and stops (written by the loader).
        store_path: label store whose row ``r`` holds the map, path and label of image ``r``;
            ``None`` for a source without maps (then ``paths`` and ``labels`` are required).
        paths: relative image path of every row (default: the store's, memory-mapped in the
            process that reads them, so nothing big is copied into the worker).
        labels: int hard label of every row (default: the store's).
        epochs: add the ``epochs`` output (each sample's epoch, for the keyed random operators).
        cutmix: draw CutMix pair boxes (adds the ``mix_box`` output; zeros in passes with mixing off).
        crops_per_image: crops the graph cuts from each image (``DataConfig.crops_per_image``): with
            k > 1 the CutMix boxes are drawn for the batch of ``batch_size * k`` crops the loader
            hands out and each sample's ``mix_box`` is ``[k, 4]``, one box per crop.
        bad_rows: rows known to be undecodable: replaced by the next good row of the epoch and marked
            :data:`SKIPPED`.
        regions: the store is a region store (:class:`~dali_relabel.store.RegionStore`): in place of
            maps, each sample gets ``crops_per_image`` of its image's stored crops, chosen by
            :meth:`~dali_relabel.store.RegionStore.select` with ``seed`` and the sample's key epoch
            (the epoch, or with repeated augmentation its copy's), with their windows
            (:func:`~dali_relabel.store.pixel_windows`), flips and top-k labels.
        seed: the data seed (``DataConfig.seed``) the stored crops are chosen with.

    Outputs (:attr:`fields`: whole-batch arrays, each sample as :mod:`dali_relabel.fields` declares):
    ``paths``, with a store the map (``logits``, ``class_ids``) or, from a region store, the stored
    crops (``region_window``, ``region_flip``, ``region_ids``, ``region_values``), ``labels``, ``rows``, ``valid``
    (:data:`VALID`, :data:`PADDING` or :data:`SKIPPED`; only :data:`VALID` samples are trained on),
    ``epochs`` (with ``epochs``), ``mix_box`` (with CutMix).
    """

    def __init__(self, image_root: str, plan: EpochPlan, control: EpochControl,
                 store_path: Optional[str] = None, paths: Optional[PathTable] = None,
                 labels: Optional[np.ndarray] = None, epochs: bool = False,
                 cutmix: Optional[CutMixSpec] = None, bad_rows: Sequence[int] = (), crops_per_image: int = 1,
                 regions: bool = False, seed: int = 0):
        if store_path is None and (paths is None or labels is None):
            raise ValueError("a source without a store needs paths and labels")
        if regions and store_path is None:
            raise ValueError("a source of stored crops needs its region store")
        image_root = os.fspath(image_root)
        self.remote = is_remote(image_root)  #: the paths are ``s3://`` URLs
        self.image_root = image_root.rstrip("/") if self.remote else os.path.abspath(image_root)
        self.prefix = (self.image_root.rstrip("/") + "/").encode("utf-8")
        self._paths = paths
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.plan = plan
        self.control = control
        self.store_path = store_path
        self.epochs = epochs
        self.cutmix = cutmix
        self.crops_per_image = int(crops_per_image)
        self.regions = bool(regions)
        self.seed = int(seed)
        self.bad_rows = np.unique(np.asarray(bad_rows, dtype=np.int64))
        self._store: Optional[Union[LabelStore, RegionStore]] = None
        self._epoch_cache: Optional[tuple] = None  # (epoch, rows, valid, key epochs) of the last epoch read
        self._owner = os.getpid()  # the loader's process; worker processes die with it

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_store=None, _epoch_cache=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if os.getpid() != self._owner:  # unpickled in a spawned worker (forked ones are armed at fork)
            die_with_parent(self._owner)

    @property
    def paths(self) -> PathTable:
        return self._paths if self._paths is not None else self.store().paths

    @property
    def labels(self) -> np.ndarray:
        return self._labels if self._labels is not None else self.store().labels

    @property
    def fields(self) -> Tuple[Field, ...]:
        """Output fields, in order (those of :data:`~dali_relabel.fields.SOURCE_FIELDS` this source has)."""
        present = {PATHS, LABELS, ROWS, VALID_FIELD}
        present.update((REGION_FIELDS if self.regions else MAP_FIELDS) if self.store_path else ())
        present.update([EPOCHS] if self.epochs else [])
        present.update([MIX_BOX] if self.cutmix is not None else [])
        return tuple(field for field in SOURCE_FIELDS if field in present)

    @property
    def names(self) -> List[str]:
        """Output names, in order."""
        return [field.name for field in self.fields]

    def path(self, row: int) -> str:
        """The absolute image path (or URL) of ``row``."""
        if self.remote:
            return self.image_root + "/" + self.paths[row]
        return os.path.join(self.image_root, self.paths[row])

    def store(self) -> Union[LabelStore, RegionStore]:
        # Opened lazily in the worker process that uses it (never shared across fork).
        if self._store is None:
            self._store = (RegionStore if self.regions else LabelStore)(self.store_path, verify="header")
        return self._store

    def epoch_rows(self, epoch: int, start=None) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(rows, valid, keys)`` of the pass over ``epoch`` from ``start`` (``(batch, position,
        unread)``; ``None``: the whole epoch): the plan's, cached for the running pass. ``keys`` are
        the samples' augmentation keys where they are not the epoch itself (repeated augmentation)."""
        cached = self._epoch_cache  # one tuple, so a reader on another thread sees a consistent one
        if cached is None or cached[0] != (epoch, start):
            where = () if start is None else start[1:]
            keys = self.plan.draw_epochs(epoch, *where) if getattr(self.plan, "repeats", 1) > 1 else None
            cached = self._epoch_cache = ((epoch, start), *self.plan.rows(epoch, *where), keys)
        return cached[1], cached[2], cached[3]

    def _span(self, batch: int, start) -> slice:
        size = self.plan.batch_size
        index = batch - (start[0] if start is not None else 0)
        return slice(index * size, (index + 1) * size)

    def batch_rows(self, epoch: int, batch: int, start=None) -> Tuple[np.ndarray, np.ndarray]:
        """``(rows, status)`` of batch ``batch`` (the epoch's number) of the pass over ``epoch`` from
        ``start``, bad rows already replaced."""
        rows, valid, _ = self.epoch_rows(epoch, start)
        size = self.plan.batch_size
        span = self._span(batch, start)
        batch_rows = rows[span].astype(np.int64)
        status = np.where(valid[span], VALID, PADDING).astype(np.uint8)
        if self.bad_rows.size:
            self._substitute(rows, span.start, batch_rows, status)
        return batch_rows, status

    def _substitute(self, epoch_rows: np.ndarray, start: int, batch_rows: np.ndarray,
                    status: np.ndarray) -> None:
        bad = np.flatnonzero(np.isin(batch_rows, self.bad_rows))
        if not bad.size:
            return
        good = np.flatnonzero(~np.isin(epoch_rows, self.bad_rows))
        if not good.size:
            raise BadImageError("no decodable image left in this epoch")
        for position in bad:  # rare: only known-bad images
            after = np.searchsorted(good, start + position) % len(good)
            batch_rows[position] = epoch_rows[good[after]]
            status[position] = SKIPPED

    def __call__(self, batch_info):
        return self.produce(*self.batch_key(batch_info))

    def batch_key(self, batch_info) -> tuple:
        """``(epoch, batch, mixing)`` (and the pass's ``start`` when it resumes inside the epoch)
        that DALI's ``batch_info`` (its epoch index and iteration) reads, as the loader's
        :class:`EpochControl` says now; ``StopIteration`` at the stream's stop. Past the end of the
        stream's first pass come the following epochs, each from its start. :meth:`produce` of the
        key is the batch."""
        epoch, first, stop, mixing = self.control.entry(batch_info.epoch_idx)
        start = self.control.start(batch_info.epoch_idx)
        if not hasattr(self.plan, "batches"):  # a plan with no global order: batches of the whole epoch
            start = None
        position = first + batch_info.iteration
        if position >= stop:
            raise StopIteration
        end = self.plan.num_batches if start is None else start[0] + self.plan.batches(*start[1:])
        if position >= end:  # the following epochs, read whole
            epoch, batch = locate(epoch, position, self.plan.num_batches, end)
            return epoch, batch, mixing
        return (epoch, position, mixing) if start is None else (epoch, position, mixing, start)

    def produce(self, epoch: int, batch: int, mixing: bool, start=None) -> tuple:
        """The outputs (in :attr:`names` order) of batch ``batch`` of ``epoch`` (of a pass from
        ``start``): a pure function of its arguments, the plan and the bad rows."""
        rows, status = self.batch_rows(epoch, batch, start)
        if self.store_path:
            self.store().check_unchanged()  # the paths and maps are mapped: a truncated file is SIGBUS
        out: Dict[str, np.ndarray] = {"paths": self.paths.gather(rows, self.prefix)[0]}
        keys = None
        if self.epochs or self.regions:
            epoch_keys = self.epoch_rows(epoch, start)[2]
            keys = np.full(len(rows), epoch, np.int64) if epoch_keys is None else epoch_keys[self._span(batch, start)]
        if self.regions:
            out.update(self._stored_crops(rows, keys))
        elif self.store_path:
            store = self.store()
            maps = store.read(rows)
            if not store.header.values_checked:  # a version-1 store: nothing vouches for its values
                self._check_maps(rows, maps.logits, maps.class_ids)
            out.update(logits=maps.logits, class_ids=maps.class_ids)
        out.update(labels=self.labels[rows][:, None], rows=rows[:, None], valid=status[:, None])
        if self.epochs:
            out["epochs"] = keys
        if self.cutmix is not None:
            out["mix_box"] = crop_boxes(self.cutmix, epoch, batch, len(rows), self.crops_per_image, mixing)
        return tuple(out[name] for name in self.names)

    def _stored_crops(self, rows: np.ndarray, keys: np.ndarray) -> Dict[str, np.ndarray]:
        """The region store's crops of ``rows`` this batch: chosen per key epoch (one vectorised
        :meth:`~dali_relabel.store.RegionStore.select` per distinct key epoch in the batch: one, or with
        repeated augmentation at most ``aug_repeats``), then one read of their boxes, flips and labels."""
        store = self.store()
        count = self.crops_per_image
        chosen = np.empty((len(rows), count), np.int64)
        for key in np.unique(keys).tolist():
            where = keys == key
            chosen[where] = store.select(self.seed, int(key), rows[where], count)
        crops = store.read(rows, chosen)
        sizes = store.image_sizes[rows]
        if not store.header.values_checked:  # nothing vouches for the values: check this batch's
            problem = region_value_problem(crops.boxes, crops.flips, crops.class_ids, crops.values, sizes,
                                           store.num_classes, store.label_type)
            if problem is not None:
                row = int(rows[problem[0]])
                raise StoreError(self.store_path, f"row {row} ({self.paths[row]}), stored {problem[1]}")
        return {"region_window": pixel_windows(crops.boxes, sizes), "region_flip": crops.flips.astype(np.int32),
                "region_ids": crops.class_ids.astype(np.int32), "region_values": crops.values.astype(np.float32)}

    def _check_maps(self, rows: np.ndarray, logits: np.ndarray, class_ids: np.ndarray) -> None:
        """One vectorised check of the batch's maps; the error names the first bad row and its file.
        Only for stores that do not record that their writer checked every value: the pooling
        operator refuses out-of-range ids and non-finite logits in any case, naming the sample."""
        problem = map_value_problem(logits, class_ids, self.store().num_classes)
        if problem is not None:
            index, what = problem
            row = int(rows[index])
            raise StoreError(self.store_path, f"row {row} ({self.paths[row]}): {what}")


def crop_boxes(cutmix: CutMixSpec, epoch: int, batch: int, images: int, crops: int, mixing: bool = True) -> np.ndarray:
    """The CutMix boxes of a batch of ``images`` images with ``crops`` crops each: float32
    ``[images, 4]`` for one crop, else ``[images, crops, 4]``: the boxes of the flat batch of
    ``images * crops`` crops (crops of one image adjacent) that the loaders hand out and mix, so
    crop j of image i shares its box with its partner in that flat batch. Zeros without ``mixing``."""
    size = images * crops
    boxes = cutmix.boxes(epoch, batch, size) if mixing else np.zeros((size, 4), np.float32)
    return boxes if crops == 1 else boxes.reshape(images, crops, 4)


def output_types(source: BatchSource):
    """(DALI dtypes, ndims) of the source's outputs, in order (``None``: taken from the data);
    ``mix_box`` has one more axis with several crops per image."""
    chosen = source.fields
    extra = {MIX_BOX: 1} if getattr(source, "crops_per_image", 1) > 1 else {}
    return [field.dali_type() for field in chosen], [field.ndim + extra[field] if field in extra else field.ndim
                                                    for field in chosen]
