"""Writing a store: row by row into ``<out>.partial``, every row checked and hashed as it arrives,
published by a durable rename once complete; one writer per output (``<out>.lock``)."""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import h5py
import numpy as np

from ..config import LAYOUTS
from ..outputs import OutputBusyError, OutputLock, durable_replace, is_lock_error
from ..paths import PathTable
from ..processes import describe_processes, processes_holding
from .format import (FORMAT_NAME, FORMAT_VERSION, HASH_CHUNK_ROWS, PARTIAL_SUFFIX, StoreError, check_map_values,
                     class_id_dtype, normalise_relpath, paths_digest, plan_hash, root_hash, row_bytes, str_array)


def _contiguous_dataset(f, name: str, shape, dtype) -> None:
    """A contiguous, uncompressed dataset allocated up front (so readers can memory-map it)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    space = h5py.h5s.create_simple(tuple(int(s) for s in shape))
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)


class StoreWriter:
    """Writes a store row by row, in a fixed order, to ``<out>.partial``; renames it when complete.

    Args:
        path: the final store path.
        paths: relative image path of every row, in row order (fixes N and the row order); paths
            that would leave the image root (absolute, ``..``) are refused.
        num_classes, k, grid_h, grid_w: map geometry.
        layout: ``"HW"`` (geometric) or ``"WH"`` (the authors' transposed convention).
        class_names: ``num_classes`` names in class-id order.
        teacher, teacher_input_size, source: provenance, stored as attributes.
        resume: continue an interrupted ``<out>.partial`` written for the same plan.
        plan_salt: what else decides the data (e.g. the source directory of the maps); a partial
            file written with another salt is started again rather than resumed.
        lock: the :class:`~dali_relabel.outputs.OutputLock` of ``path``, already held by the caller
            (who took it before starting worker processes, and releases it); by default the writer
            takes it and releases it when it finishes or closes.

    One writer per output: a second writer of the same ``path`` is refused with
    :class:`~dali_relabel.outputs.OutputBusyError`. A partial file is never truncated unless it can be
    opened: one held open by another process raises :class:`~dali_relabel.outputs.OutputBusyError`
    (naming the processes), a damaged one :class:`StoreError`, and the file is kept; with
    ``resume=False`` an openable or damaged partial file is discarded.

    Rows are written with :meth:`write` in order; :attr:`rows_written` says where to continue after
    a resume. Every row is checked as it is written (class ids in range and distinct per cell, finite
    logits, labels in ``[-1, num_classes)``) and hashed per block of rows; :meth:`finish` records the
    hashes and publishes the file durably (fsync, rename, fsync of the directory). :meth:`close` and
    :meth:`reopen` let a caller fork worker processes in between, so that none inherits the open file.
    """

    def __init__(self, path, paths: Sequence[str], num_classes: int, k: int, grid_h: int,
                 grid_w: int, layout: str, class_names: Sequence[str], teacher: str = "",
                 teacher_input_size: int = 0, source: str = "", resume: bool = True,
                 plan_salt: str = "", lock: Optional[OutputLock] = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'HW' or 'WH', got {layout!r}")
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.path = os.fspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.paths = [normalise_relpath(p) for p in paths]
        self.num_rows = len(self.paths)
        if self.num_rows == 0:
            raise ValueError("a store needs at least one row")
        self.path_table = PathTable.from_strings(self.paths)
        self.path_table.check_confined("image paths")
        self.num_classes = int(num_classes)
        self.class_names = [str(c) for c in class_names]
        self.map_shape = (int(k), int(grid_h), int(grid_w))
        self.ids_dtype = class_id_dtype(num_classes)
        attrs = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, num_rows=self.num_rows,
                     num_classes=self.num_classes, k=int(k), grid_h=int(grid_h), grid_w=int(grid_w),
                     layout=layout, teacher=str(teacher), teacher_input_size=int(teacher_input_size),
                     source=str(source), hash_chunk_rows=HASH_CHUNK_ROWS, values_checked=True)
        self._plan = plan_hash(self.paths, {**attrs, "class_names": self.class_names, "salt": plan_salt})
        self._file = None
        self._partial_stat = None
        if lock is not None and (not lock.held or os.path.abspath(lock.out) != os.path.abspath(self.path)):
            raise ValueError(f"the lock given ({lock!r}) is not a held lock of {self.path}")
        self._own_lock = lock is None
        self._lock = lock if lock is not None else OutputLock(self.path).acquire()
        try:
            if resume and os.path.exists(self.partial_path):
                self._file = self._try_resume()
            if self._file is None:
                self._file = self._create(attrs)
        except BaseException:
            self._release_lock()
            raise
        self._partial_stat = os.stat(self.partial_path)
        self._rows_written = int(self._file.attrs["rows_written"])
        self._chunk = hashlib.sha256()
        done = self.rows_written
        chunk_start = done - done % HASH_CHUNK_ROWS
        if done > chunk_start:  # resumed inside a block: hash its rows written so far again
            f = self._file
            self._chunk.update(row_bytes(f["logits"][chunk_start:done], f["class_ids"][chunk_start:done],
                                         f["labels"][chunk_start:done], f["image_sizes"][chunk_start:done]))

    @property
    def rows_written(self) -> int:
        """Rows in the partial file (also while it is closed)."""
        return self._rows_written

    def _open_partial(self, mode: str):
        """The partial file opened with ``mode``; never truncated: raise if it cannot be opened."""
        try:
            return h5py.File(self.partial_path, mode)
        except OSError as error:
            if is_lock_error(error):
                holders = describe_processes(processes_holding(self.partial_path))
                raise OutputBusyError(self.partial_path, (
                    f"{self.partial_path} is held open by another process"
                    f"{f' ({holders})' if holders else ''}: another run is writing it, or worker "
                    "processes of a killed run live on. Stop them (or wait), then run again; the "
                    "file is kept.")) from None
            if mode == "r":
                return None  # damaged: the caller discards it
            raise StoreError(self.partial_path, (
                f"cannot be opened to resume the interrupted write ({error}); it may be damaged. It is "
                "kept: remove it, or start again with --restart (resume=False)")) from None

    def _try_resume(self):
        f = self._open_partial("r+")
        if f.attrs.get("plan_sha256") != self._plan:
            f.close()
            return None  # written for another plan: start again
        return f

    def _discard_partial(self) -> None:
        """Remove an old partial file, unless another process holds it open."""
        if not os.path.exists(self.partial_path):
            return
        f = self._open_partial("r")  # raises if another process holds it
        if f is not None:
            f.close()
        os.remove(self.partial_path)

    def _create(self, attrs: dict):
        self._discard_partial()
        f = h5py.File(self.partial_path, "x")
        f.attrs.update(attrs)
        f.attrs["complete"] = False
        f.attrs["rows_written"] = 0
        f.attrs["plan_sha256"] = self._plan
        n, shape = self.num_rows, self.map_shape
        _contiguous_dataset(f, "logits", (n,) + shape, np.float16)
        _contiguous_dataset(f, "class_ids", (n,) + shape, self.ids_dtype)
        _contiguous_dataset(f, "labels", (n,), np.int32)
        _contiguous_dataset(f, "image_sizes", (n, 2), np.int32)
        _contiguous_dataset(f, "path_offsets", (n + 1,), np.int64)
        _contiguous_dataset(f, "path_bytes", (len(self.path_table.data),), np.uint8)
        f["path_offsets"][...] = self.path_table.offsets
        f["path_bytes"][...] = self.path_table.data
        f.create_dataset("class_names", data=str_array(self.class_names))
        f.create_dataset("chunk_sha256", shape=(-(-n // HASH_CHUNK_ROWS), 32), dtype=np.uint8)
        f.flush()
        return f

    def write(self, start: int, logits: np.ndarray, class_ids: np.ndarray,
              labels: Optional[np.ndarray] = None, image_sizes: Optional[np.ndarray] = None) -> None:
        """Write rows ``start .. start + len(logits) - 1``; ``start`` must equal :attr:`rows_written`.

        ``labels`` default to -1 (unknown), ``image_sizes`` to (0, 0).
        """
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected row {self.rows_written}, got {start}")
        if self._file is None:
            raise ValueError(f"{self.partial_path} is closed (reopen() it to go on writing)")
        logits = np.asarray(logits)
        class_ids = np.asarray(class_ids)
        count = len(logits)
        if logits.shape[1:] != self.map_shape or class_ids.shape != logits.shape:
            raise ValueError(f"maps of shape {logits.shape[1:]} / {class_ids.shape[1:]} do not match "
                             f"the store's (k, H, W) = {self.map_shape}")
        if start + count > self.num_rows:
            raise ValueError(f"writing rows up to {start + count} into a store of {self.num_rows}")
        with np.errstate(over="ignore"):
            logits = logits.astype(np.float16)  # checked after the cast: 1e5 becomes inf here
        where = f"rows {start}..{start + count - 1}"
        check_map_values(logits, class_ids, self.num_classes, where)
        labels = (np.full(count, -1, np.int32) if labels is None
                  else np.asarray(labels).astype(np.int32, casting="unsafe").reshape(count))
        if ((labels < -1) | (labels >= self.num_classes)).any():
            bad = int(labels[(labels < -1) | (labels >= self.num_classes)][0])
            raise ValueError(f"{where}: label {bad} is outside [-1, {self.num_classes})")
        sizes = (np.zeros((count, 2), np.int32) if image_sizes is None
                 else np.asarray(image_sizes, dtype=np.int32).reshape(count, 2))
        if (sizes < 0).any():
            raise ValueError(f"{where}: image sizes must not be negative")
        ids = class_ids.astype(self.ids_dtype)
        stop = start + count
        f = self._file
        f["logits"][start:stop] = logits
        f["class_ids"][start:stop] = ids
        f["labels"][start:stop] = labels
        f["image_sizes"][start:stop] = sizes
        self._hash_rows(start, row_bytes(logits, ids, labels, sizes))
        f.attrs["rows_written"] = stop
        f.flush()
        self._rows_written = stop

    def _hash_rows(self, start: int, data: np.ndarray) -> None:
        """Feed rows ``start ..`` into the block hashes, recording each block as it completes."""
        row = start
        while len(data):
            chunk = row // HASH_CHUNK_ROWS
            take = min(len(data), (chunk + 1) * HASH_CHUNK_ROWS - row)
            self._chunk.update(data[:take].tobytes())
            row, data = row + take, data[take:]
            if row % HASH_CHUNK_ROWS == 0 or row == self.num_rows:
                self._file["chunk_sha256"][chunk] = np.frombuffer(self._chunk.digest(), np.uint8)
                self._chunk = hashlib.sha256()

    def finish(self) -> str:
        """Record the content hash, mark complete, close and rename to the final path; returns it."""
        if self.rows_written != self.num_rows:
            raise ValueError(f"only {self.rows_written} of {self.num_rows} rows were written")
        self.reopen()
        f = self._file
        f.attrs["content_sha256"] = root_hash(f["chunk_sha256"][()], paths_digest(self.path_table),
                                              self.class_names)
        f.attrs["complete"] = True
        f.close()
        self._file = None
        try:
            self._check_still_ours()
            durable_replace(self.partial_path, self.path)
        finally:
            self._release_lock()
        return self.path

    def _check_still_ours(self) -> None:
        try:
            current = os.stat(self.partial_path)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(current, self._partial_stat):
            raise StoreError(self.partial_path, "was removed or replaced by another process while this "
                                                "writer filled it; not published")

    def close(self) -> None:
        """Close without publishing (the partial file stays, resumable); releases the writer's own lock."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._release_lock()

    def reopen(self) -> None:
        """Open the partial file again after :meth:`close`, to go on writing where it stopped (call it
        after forking worker processes, so that none of them inherits the open file and its lock)."""
        if self._file is not None:
            return
        if not self._lock.held:
            self._lock.acquire()
        try:
            self._check_still_ours()
            f = self._open_partial("r+")
            if f.attrs.get("plan_sha256") != self._plan or int(f.attrs["rows_written"]) != self._rows_written:
                f.close()
                raise StoreError(self.partial_path, "was changed by another process while closed")
        except BaseException:
            self._release_lock()
            raise
        self._file = f

    def _release_lock(self) -> None:
        if self._own_lock and getattr(self, "_lock", None) is not None:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self._file is not None and self.rows_written == self.num_rows:
            self.finish()
        else:
            self.close()


def write_store(path, paths: Sequence[str], logits: np.ndarray, class_ids: np.ndarray,
                num_classes: int, class_names: Optional[Sequence[str]] = None, layout: str = "HW",
                labels: Optional[Sequence[int]] = None, image_sizes=None, **provenance) -> str:
    """Write a whole store from in-memory arrays (``logits``/``class_ids`` ``[N, k, H, W]``)."""
    logits = np.asarray(logits)
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    k, grid_h, grid_w = logits.shape[1:]
    with StoreWriter(path, paths, num_classes, k, grid_h, grid_w, layout, names, resume=False,
                     **provenance) as writer:
        writer.write(0, logits, class_ids, labels, image_sizes)
    return os.fspath(path)
