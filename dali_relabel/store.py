"""The HDF5 label-map store: writer, reader and open-time validation.

The format (version 2) is specified in ``docs/store_format.md``. In short: one file, one row per
image, ``logits [N, k, H, W]`` float16 and ``class_ids [N, k, H, W]`` (smallest unsigned type that
holds ``num_classes``), each row's relative image path (one contiguous byte buffer plus offsets), hard
label and image size, and the class names. Every value is checked once, when it is written, and the
file records that together with a SHA-256 per block of rows. Readers map the big arrays into memory
(so gathering a batch of random rows costs one numpy fancy-index and every process on a node shares
the page cache), check the header and a sample of the hashes at open, and open the file lazily in
each process, so a store object can be handed to DALI workers and DDP ranks before or after ``fork``.
Version 1 files (paths as HDF5 strings, nothing recorded) are still read.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import h5py
import numpy as np

from .errors import DaliRelabelError
from .outputs import OutputBusyError, OutputLock, describe_processes, durable_replace, is_lock_error, \
    processes_holding
from .paths import PathTable

FORMAT_NAME = "dali-relabel-label-store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PARTIAL_SUFFIX = ".partial"
HASH_CHUNK_ROWS = 1024  # rows per recorded SHA-256 (version 2): ~4.6 MB of ImageNet maps
#: How much a reader checks at open: the header only; plus the paths' hash and one random block's
#: hash; plus every block's hash and every value.
VERIFY_LEVELS = ("header", "sample", "full")
_SCAN_ROWS = 8192


class StoreError(DaliRelabelError, ValueError):
    """A label store is missing, malformed, incomplete or does not fit its use."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def class_id_dtype(num_classes: int) -> np.dtype:
    """The smallest integer dtype able to hold class ids ``0 .. num_classes - 1``."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True)
class StoreHeader:
    """The root attributes of a store (see ``docs/store_format.md``)."""

    num_rows: int
    num_classes: int
    k: int
    grid_h: int
    grid_w: int
    layout: str
    teacher: str = ""
    teacher_input_size: int = 0
    source: str = ""
    content_sha256: str = ""
    format_version: int = FORMAT_VERSION
    values_checked: bool = False

    @property
    def map_shape(self):
        """Shape of one row's map, ``(k, grid_h, grid_w)``."""
        return (self.k, self.grid_h, self.grid_w)


@dataclass
class LabelMap:
    """One image's label map: ``logits [k, H, W]`` and ``class_ids [k, H, W]``."""

    logits: np.ndarray
    class_ids: np.ndarray


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype("utf-8"))


def _decode_strings(dataset) -> List[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in dataset[()]]


def _normalise_relpath(path: str) -> str:
    return str(path).replace(os.sep, "/")


# -- hashing --------------------------------------------------------------------------------------
def row_bytes(logits, class_ids, labels, image_sizes) -> np.ndarray:
    """The bytes of rows ``[n]`` as hashed (version 2): each row's logits, class ids, label and size,
    row after row, as a uint8 ``[n, bytes per row]`` array."""
    n = len(logits)
    parts = [np.ascontiguousarray(a).reshape(n, -1).view(np.uint8)
             for a in (logits, class_ids, np.asarray(labels).reshape(n, 1), np.asarray(image_sizes).reshape(n, 2))]
    return np.concatenate(parts, axis=1)


def paths_digest(paths: PathTable) -> bytes:
    """SHA-256 of the path table (offsets as little-endian int64, then the bytes)."""
    digest = hashlib.sha256(np.ascontiguousarray(paths.offsets, dtype="<i8"))
    digest.update(np.ascontiguousarray(paths.data))
    return digest.digest()


def root_hash(chunk_digests: np.ndarray, path_digest: bytes, class_names: Sequence[str]) -> str:
    """A version-2 store's ``content_sha256``: over the row blocks' hashes, the paths and the names."""
    digest = hashlib.sha256(b"dali-relabel-label-store/2\0")
    digest.update(np.ascontiguousarray(chunk_digests, dtype=np.uint8).tobytes())
    digest.update(path_digest)
    digest.update("\n".join(class_names).encode("utf-8"))
    return digest.hexdigest()


def content_hash_v1(logits, class_ids, labels, image_sizes, paths: Sequence[str]) -> str:
    """A version-1 store's ``content_sha256`` (arrays in row blocks, then the joined paths)."""
    digest = hashlib.sha256()
    n = len(paths)
    for start in range(0, n, _SCAN_ROWS):
        stop = min(n, start + _SCAN_ROWS)
        for array in (logits, class_ids, labels, image_sizes):
            digest.update(np.ascontiguousarray(array[start:stop]).tobytes())
    digest.update("\n".join(paths).encode("utf-8"))
    return digest.hexdigest()


def plan_hash(paths: Sequence[str], header_items: dict) -> str:
    """Hash of what a writer plans to write: the path list and the header, for safe resuming."""
    digest = hashlib.sha256()
    digest.update(repr(sorted(header_items.items())).encode("utf-8"))
    digest.update("\n".join(paths).encode("utf-8"))
    return digest.hexdigest()


# -- value rules ----------------------------------------------------------------------------------
def map_value_problem(logits: np.ndarray, class_ids: np.ndarray, num_classes: int):
    """``None`` if a batch of maps ``[n, k, H, W]`` keeps the format's rules (every class id in
    ``[0, num_classes)``, distinct within each cell, every logit finite), else ``(index of the first
    bad map, what is wrong)``."""
    n = len(logits)
    if n == 0:
        return None
    bad_ids = ((class_ids < 0) | (class_ids >= num_classes)).reshape(n, -1).any(axis=1)
    bad_logits = ~np.isfinite(logits).reshape(n, -1).all(axis=1)
    ordered = np.sort(class_ids.reshape(n, class_ids.shape[1], -1), axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).reshape(n, -1).any(axis=1)
    bad = bad_ids | bad_logits | repeated
    if not bad.any():
        return None
    first = int(np.flatnonzero(bad)[0])
    if bad_ids[first]:
        ids = class_ids[first].reshape(-1)
        value = ids[(ids < 0) | (ids >= num_classes)][0]
        return first, f"class id {int(value)} is outside [0, {num_classes})"
    if bad_logits[first]:
        position = int(np.flatnonzero(~np.isfinite(logits[first]).reshape(-1))[0])
        index = tuple(int(i) for i in np.unravel_index(position, logits.shape[1:]))
        return first, f"logit at index {index} is {logits[first][index]} (not finite)"
    ids = class_ids[first].reshape(class_ids.shape[1], -1)
    cell = int(np.flatnonzero((np.sort(ids, axis=0)[1:] == np.sort(ids, axis=0)[:-1]).any(axis=0))[0])
    y, x = np.unravel_index(cell, class_ids.shape[2:])
    return first, (f"cell ({int(y)}, {int(x)}) holds class ids {sorted(int(c) for c in ids[:, cell])}: "
                   "a class may appear once per cell")


def check_map_values(logits: np.ndarray, class_ids: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if maps break the format's rules (see
    :func:`map_value_problem`); ``logits``/``class_ids`` of one map ``[k, H, W]`` or a batch ``[n, k, H, W]``."""
    batch = logits.ndim == 4
    problem = map_value_problem(logits if batch else logits[None], class_ids if batch else class_ids[None],
                                num_classes)
    if problem is not None:
        index, what = problem
        raise ValueError(f"{where}{f' (map {index})' if batch else ''}: {what}")


# -- writing --------------------------------------------------------------------------------------
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
        if layout not in ("HW", "WH"):
            raise ValueError(f"layout must be 'HW' or 'WH', got {layout!r}")
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.path = os.fspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.paths = [_normalise_relpath(p) for p in paths]
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
        f.create_dataset("class_names", data=_str_array(self.class_names))
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


# -- reading --------------------------------------------------------------------------------------
def _memmap_dataset(path: str, dataset, advice: Optional[int] = None) -> Optional[np.ndarray]:
    """A read-only memory map of a contiguous, uncompressed, allocated dataset, else ``None``."""
    if dataset.chunks is not None or dataset.compression is not None or dataset.size == 0:
        return None
    offset = dataset.id.get_offset()
    if offset is None:
        return None
    array = np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
    raw = getattr(array, "_mmap", None)
    if advice is not None and raw is not None:
        raw.madvise(advice)
    return array


_RANDOM = getattr(mmap, "MADV_RANDOM", None)  # batch reads: read-around would fetch unused pages
_SEQUENTIAL = getattr(mmap, "MADV_SEQUENTIAL", None)  # scans: read ahead


class LabelStore:
    """Read access to a store, validated at open.

    Args:
        path: the store file.
        verify: how much to check at open (:data:`VERIFY_LEVELS`):

            * ``"header"``: format, version, completeness, dataset shapes and dtypes, and that the
              writer checked every value; nothing is read beyond the header (what worker processes
              and tools that only read the header use);
            * ``"sample"`` (default): also the paths (hash, and confinement to the image root) and
              the hash of one random block of rows; a version-1 store, which records no checks, has
              its values scanned;
            * ``"full"``: every block's hash and every value (reads the whole file sequentially).

    The HDF5 handle is opened lazily and reopened after ``fork``, so the object is safe to pickle and
    to share with worker processes. The big arrays, the paths, labels and sizes are memory-mapped: a
    process holds no copy of its own.
    """

    def __init__(self, path, verify: str = "sample"):
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        self.path = os.fspath(path)
        self._pid = None
        self._file = None
        self._arrays = {}
        self._paths: Optional[PathTable] = None
        self._row_of_path = None
        if not os.path.exists(self.path):
            hint = ""
            if os.path.exists(self.path + PARTIAL_SUFFIX):
                hint = (f" ({self.path + PARTIAL_SUFFIX} exists: the write was interrupted; rerun the "
                        "same command to resume it)")
            raise StoreError(self.path, "no such store" + hint)
        self.header = self._validate_header()
        self.class_names: List[str] = _decode_strings(self._open()["class_names"])
        if verify in ("sample", "full"):
            self._verify_at_open(full=verify == "full")
        self.verified = verify  #: what was checked at open (one of :data:`VERIFY_LEVELS`)

    # -- opening ---------------------------------------------------------------------------------
    def _open(self):
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork must not be used: open a fresh one in this process.
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as error:
                raise StoreError(self.path, f"cannot be opened as HDF5 ({error})") from None
            self._pid = os.getpid()
            self._arrays = {}
            self._paths = None
        return self._file

    def _array(self, name: str):
        """Dataset ``name`` memory-mapped (random access), or the h5py dataset if it cannot be."""
        f = self._open()
        if name not in self._arrays:
            mapped = _memmap_dataset(self.path, f[name], _RANDOM if name in ("logits", "class_ids") else None)
            self._arrays[name] = mapped if mapped is not None else f[name]
        return self._arrays[name]

    def _validate_header(self) -> StoreHeader:
        f = self._open()
        attrs = f.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(self.path, f"not a dali-relabel label store (format attribute is "
                                        f"{attrs.get('format')!r})")
        version = int(attrs.get("format_version", -1))
        if version not in READABLE_VERSIONS:
            raise StoreError(self.path, f"format version {version} is not supported (this reader "
                                        f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                                        "upgrade dali-relabel or reconvert the maps")
        if not bool(attrs.get("complete", False)):
            raise StoreError(self.path, "the store is incomplete (its write was interrupted)")
        try:
            header = StoreHeader(
                num_rows=int(attrs["num_rows"]), num_classes=int(attrs["num_classes"]),
                k=int(attrs["k"]), grid_h=int(attrs["grid_h"]), grid_w=int(attrs["grid_w"]),
                layout=str(attrs["layout"]), teacher=str(attrs.get("teacher", "")),
                teacher_input_size=int(attrs.get("teacher_input_size", 0)),
                source=str(attrs.get("source", "")),
                content_sha256=str(attrs.get("content_sha256", "")), format_version=version,
                values_checked=version >= 2 and bool(attrs.get("values_checked", False)))
        except KeyError as missing:
            raise StoreError(self.path, f"header attribute {missing} is missing") from None
        if header.layout not in ("HW", "WH"):
            raise StoreError(self.path, f"layout {header.layout!r} is neither 'HW' nor 'WH'")
        n, map_shape = header.num_rows, header.map_shape
        expected = {
            "logits": ((n,) + map_shape, [np.dtype(np.float16), np.dtype(np.float32)]),
            "class_ids": ((n,) + map_shape, None),
            "labels": ((n,), None),
            "image_sizes": ((n, 2), None),
            "class_names": ((header.num_classes,), None),
        }
        if version == 1:
            expected["paths"] = ((n,), None)
        else:
            expected["path_offsets"] = ((n + 1,), [np.dtype(np.int64)])
            expected["path_bytes"] = (None, [np.dtype(np.uint8)])
            expected["chunk_sha256"] = ((-(-n // int(attrs.get("hash_chunk_rows", HASH_CHUNK_ROWS))), 32),
                                        [np.dtype(np.uint8)])
        for name, (shape, dtypes) in expected.items():
            if name not in f:
                raise StoreError(self.path, f"dataset '{name}' is missing")
            if shape is not None and f[name].shape != shape:
                raise StoreError(self.path, f"dataset '{name}' has shape {f[name].shape}, expected "
                                            f"{shape} from the header")
            if dtypes is not None and f[name].dtype not in dtypes:
                raise StoreError(self.path, f"dataset '{name}' has dtype {f[name].dtype}")
        if f["class_ids"].dtype.kind not in "iu":
            raise StoreError(self.path, f"class_ids must be integers, found {f['class_ids'].dtype}")
        return header

    def _verify_at_open(self, full: bool) -> None:
        paths = self.paths
        try:
            paths.check_confined("stored image paths")
        except ValueError as error:
            raise StoreError(self.path, str(error)) from None
        labels = np.asarray(self.labels)
        bad = (labels < -1) | (labels >= self.num_classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise StoreError(self.path, f"row {row} ({paths[row]}) has label {int(labels[row])}, outside "
                                        f"[-1, {self.num_classes})")
        if self.header.format_version == 1:
            self.check_values()
            if full:
                self.verify_checksum()
            return
        if not self.header.values_checked or full:
            self.check_values()
        if full:
            self.verify_checksum()
            return
        f = self._open()
        if root_hash(f["chunk_sha256"][()], paths_digest(paths), self.class_names) != self.header.content_sha256:
            raise StoreError(self.path, "content checksum mismatch in the image paths, class names or "
                                        "recorded hashes (the file was changed or damaged after it was written)")
        chunks = len(f["chunk_sha256"])
        self.verify_checksum(chunks=[int(np.random.default_rng().integers(chunks))])

    # -- checks ----------------------------------------------------------------------------------
    def _scan_arrays(self):
        """``(logits, class_ids)`` mapped for one sequential pass (read-ahead on)."""
        f = self._open()
        mapped = [_memmap_dataset(self.path, f[name], _SEQUENTIAL) for name in ("logits", "class_ids")]
        return [m if m is not None else f[name] for m, name in zip(mapped, ("logits", "class_ids"))]

    def check_values(self) -> None:
        """Scan every map (sequentially); raise :class:`StoreError` naming the first bad row."""
        logits, class_ids = self._scan_arrays()
        n = self.header.num_rows
        for start in range(0, n, _SCAN_ROWS):
            stop = min(n, start + _SCAN_ROWS)
            problem = map_value_problem(np.asarray(logits[start:stop]), np.asarray(class_ids[start:stop]),
                                        self.num_classes)
            if problem is not None:
                row = start + problem[0]
                raise StoreError(self.path, f"row {row} ({self.paths[row]}): {problem[1]}")

    def verify_checksum(self, chunks: Optional[Sequence[int]] = None) -> None:
        """Recompute the content hash (every block, or the blocks ``chunks``) and compare it with
        what the writer recorded; raise :class:`StoreError` on a mismatch."""
        f = self._open()
        if self.header.format_version == 1:
            actual = content_hash_v1(self._array("logits"), self._array("class_ids"), f["labels"],
                                     f["image_sizes"], self.paths.tolist())
            if actual != self.header.content_sha256:
                raise StoreError(self.path, f"content checksum mismatch (stored "
                                            f"{self.header.content_sha256[:12]}, actual {actual[:12]})")
            return
        recorded = f["chunk_sha256"][()]
        if chunks is None:
            if root_hash(recorded, paths_digest(self.paths), self.class_names) != self.header.content_sha256:
                raise StoreError(self.path, "content checksum mismatch in the image paths, class names or "
                                            "recorded hashes (the file was changed or damaged after it was "
                                            "written)")
            chunks = range(len(recorded))
        logits, class_ids = self._scan_arrays()
        rows = int(f.attrs.get("hash_chunk_rows", HASH_CHUNK_ROWS))
        for chunk in chunks:
            start, stop = chunk * rows, min(self.header.num_rows, (chunk + 1) * rows)
            data = row_bytes(np.asarray(logits[start:stop]), np.asarray(class_ids[start:stop]),
                             np.asarray(self.labels[start:stop]), np.asarray(self.image_sizes[start:stop]))
            if hashlib.sha256(data).digest() != recorded[chunk].tobytes():
                raise StoreError(self.path, f"content checksum mismatch in rows {start}..{stop - 1} (the "
                                            "file was changed or damaged after it was written)")

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.header.num_rows

    @property
    def num_classes(self) -> int:
        return self.header.num_classes

    @property
    def layout(self) -> str:
        return self.header.layout

    @property
    def paths(self) -> PathTable:
        """Every row's image path relative to the image root (memory-mapped)."""
        self._open()
        if self._paths is None:
            f = self._file
            if self.header.format_version == 1:
                self._paths = PathTable.from_strings(_decode_strings(f["paths"]))
            else:
                offsets = self._array("path_offsets")
                data = self._array("path_bytes")
                self._paths = PathTable(np.asarray(data) if not isinstance(data, np.ndarray) else data,
                                        np.asarray(offsets) if not isinstance(offsets, np.ndarray) else offsets)
        return self._paths

    @property
    def labels(self) -> np.ndarray:
        """int32 ``[N]`` hard labels (-1: unknown), memory-mapped."""
        return np.asarray(self._array("labels"))

    @property
    def image_sizes(self) -> np.ndarray:
        """int32 ``[N, 2]`` (height, width) of each image, memory-mapped."""
        return np.asarray(self._array("image_sizes"))

    def read(self, rows) -> LabelMap:
        """Maps of ``rows`` (an int or a sequence): ``logits [n, k, H, W]``, ``class_ids [n, k, H, W]``."""
        logits, class_ids = self._array("logits"), self._array("class_ids")
        if np.isscalar(rows):
            row = int(rows)
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} is outside the store's {len(self)} rows")
            return LabelMap(np.asarray(logits[row]), np.asarray(class_ids[row]))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)}) requested")
        if isinstance(logits, np.ndarray):
            return LabelMap(logits[rows], class_ids[rows])
        # h5py needs increasing indices: read sorted unique rows, then restore the order.
        unique, inverse = np.unique(rows, return_inverse=True)
        return LabelMap(logits[unique][inverse], class_ids[unique][inverse])

    def read_checked(self, row: int) -> LabelMap:
        """One row's map, with its values checked; errors name the row and its image path."""
        label_map = self.read(int(row))
        try:
            check_map_values(label_map.logits, label_map.class_ids, self.num_classes, "map")
        except ValueError as error:
            raise StoreError(self.path, f"row {row} ({self.paths[row]}): {error}") from None
        return label_map

    def __getitem__(self, row: int) -> LabelMap:
        return self.read(int(row))

    def row_of(self, relpath: str) -> int:
        """The row holding the map of image ``relpath`` (``KeyError`` if there is none)."""
        if self._row_of_path is None:
            self._row_of_path = {p: i for i, p in enumerate(self.paths.tolist())}
        return self._row_of_path[_normalise_relpath(relpath)]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._arrays = {}
        self._paths = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_file=None, _arrays={}, _paths=None, _pid=None, _row_of_path=None)
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        h = self.header
        return (f"LabelStore({self.path!r}, rows={h.num_rows}, classes={h.num_classes}, "
                f"k={h.k}, grid={h.grid_h}x{h.grid_w}, layout={h.layout}, version={h.format_version})")


def summarize(store: LabelStore, sample_rows: int = 1024, seed: int = 0) -> dict:
    """Header, counts and sanity statistics of a store (from a random sample of rows)."""
    h = store.header
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), size=min(sample_rows, len(store)), replace=False))
    maps = store.read(rows)
    logits = maps.logits.astype(np.float32)
    top1 = maps.class_ids[:, 0].reshape(len(rows), -1)
    hard = store.labels[rows]
    known = hard >= 0
    agree = float(np.mean([np.bincount(t, minlength=h.num_classes).argmax() == y
                           for t, y in zip(top1[known], hard[known])])) if known.any() else float("nan")
    size_bytes = os.path.getsize(store.path)
    return {
        "path": store.path, "format_version": h.format_version, "rows": h.num_rows,
        "num_classes": h.num_classes, "k": h.k, "grid": [h.grid_h, h.grid_w], "layout": h.layout,
        "teacher": h.teacher, "teacher_input_size": h.teacher_input_size, "source": h.source,
        "content_sha256": h.content_sha256, "values_checked_when_written": h.values_checked,
        "file_bytes": size_bytes, "bytes_per_image": size_bytes / max(1, h.num_rows),
        "class_ids_dtype": str(store._array("class_ids").dtype),
        "memory_mapped": isinstance(store._array("logits"), np.ndarray),
        "sampled_rows": int(len(rows)),
        "logit_mean": float(logits.mean()), "logit_min": float(logits.min()), "logit_max": float(logits.max()),
        "top1_logit_mean": float(logits[:, 0].mean()),
        "hard_label_known": float(known.mean()),
        "majority_top1_equals_hard_label": agree,
        "distinct_classes_in_sample": int(len(np.unique(maps.class_ids))),
    }
