"""What every store kind shares: one HDF5 file of N rows, written and read with the same guarantees.

A store kind (the label-map store, the region store) declares its root attributes, its per-row
datasets and its rules; this module gives both of them the rest:

* :class:`RowFileWriter`: one writer per output (``<out>.lock``), rows written in order into
  ``<out>.partial`` and hashed per block as they arrive, an interrupted write resumed (same plan) or
  started again, a partial file never truncated while another process holds it, and a durable publish
  (fsync, rename, fsync of the directory) once the last row and the root hash are written;
* :class:`RowFileReader`: the header checked at open (format name and version, ``complete``, every
  dataset's shape, dtype and storage: no links, external or virtual data, nothing past the end of the
  file), the paths, labels and big arrays memory-mapped, the HDF5 handle reopened after ``fork``, the
  file compared with the one opened before every batch, and the verify levels (``header``,
  ``sample``: paths, labels, root hash and one random block; ``full``: every block and value).

The byte layout each kind hashes is its datasets' bytes row after row, in the order it declares
(:func:`~dali_relabel.store.format.row_bytes`); the root hash covers the block hashes, the paths and
the class names, behind a prefix naming the format (:func:`~dali_relabel.store.format.root_hash`).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from ..outputs import OutputBusyError, OutputLock, durable_replace, is_lock_error
from ..paths import PathTable
from ..processes import describe_processes, processes_holding
from ..remote import cached_copy, is_remote
from .format import (PARTIAL_SUFFIX, VERIFY_LEVELS, StoreError, decode_strings, normalise_relpath, paths_digest,
                     plan_hash, root_hash, row_bytes, str_array)

#: Compressed (chunked) datasets may declare at most this many times their stored bytes (gzip's
#: best ratio is about 1030:1).
MAX_COMPRESSION = 1100

_RANDOM = getattr(mmap, "MADV_RANDOM", None)  # batch reads: read-around would fetch unused pages
_SEQUENTIAL = getattr(mmap, "MADV_SEQUENTIAL", None)  # scans: read ahead


def format_of(path) -> str:
    """The ``format`` attribute of the HDF5 file ``path`` (``""`` if it has none); raises
    :class:`StoreError` if the file is missing or not HDF5."""
    path = os.fspath(path)
    if not os.path.exists(path):
        hint = ""
        if os.path.exists(path + PARTIAL_SUFFIX):
            hint = (f" ({path + PARTIAL_SUFFIX} exists: the write was interrupted; rerun the same command to "
                    "resume it)")
        raise StoreError(path, "no such store" + hint)
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("format", "")
    except OSError as error:
        raise StoreError(path, f"cannot be opened as HDF5 ({error})") from None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def contiguous_dataset(f, name: str, shape, dtype) -> None:
    """A contiguous, uncompressed dataset allocated up front (so readers can memory-map it)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    space = h5py.h5s.create_simple(tuple(int(s) for s in shape))
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)


# -- writing --------------------------------------------------------------------------------------
class RowFileWriter:
    """The writing half every store kind shares (see the module docstring).

    A subclass builds its root ``attrs`` (``format``, ``format_version`` and its geometry), names its
    per-row datasets with :meth:`row_datasets` (in the order they are hashed), checks each batch and
    hands it to :meth:`_store_rows`. Rows are written in order; :attr:`rows_written` says where to go
    on after a resume. :meth:`close` and :meth:`reopen` let a caller fork worker processes in between,
    so that none inherits the open file.

    Args:
        path: the final store path.
        paths: relative image path of every row, in row order (fixes N); paths that would leave the
            image root (absolute, ``..``) are refused.
        attrs: the root attributes of the store (they and the paths decide whether a partial file
            may be resumed).
        class_names: ``num_classes`` names in class-id order.
        hash_chunk_rows: rows per recorded block hash.
        hash_prefix: what the root hash starts with (names the format and its version).
        resume, plan_salt, lock: see :class:`~dali_relabel.store.StoreWriter`.
    """

    def __init__(self, path, paths: Sequence[str], attrs: dict, class_names: Sequence[str], hash_chunk_rows: int,
                 hash_prefix: bytes, resume: bool = True, plan_salt: str = "", lock: Optional[OutputLock] = None):
        self.path = os.fspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self.paths = [normalise_relpath(p) for p in paths]
        self.num_rows = len(self.paths)
        if self.num_rows == 0:
            raise ValueError("a store needs at least one row")
        self.path_table = PathTable.from_strings(self.paths)
        self.path_table.check_confined("image paths")
        self.class_names = [str(c) for c in class_names]
        self.hash_chunk_rows = int(hash_chunk_rows)
        self._hash_prefix = hash_prefix
        attrs = dict(attrs, hash_chunk_rows=self.hash_chunk_rows, values_checked=True)
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
        chunk_start = done - done % self.hash_chunk_rows
        if done > chunk_start:  # resumed inside a block: hash its rows written so far again
            self._chunk.update(row_bytes(*(self._file[name][chunk_start:done] for name in self.row_datasets())))

    def row_datasets(self) -> Dict[str, Tuple[tuple, np.dtype]]:
        """``{name: (shape of one row, dtype)}`` of the per-row datasets, in the order they are hashed."""
        raise NotImplementedError

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
        n = self.num_rows
        for name, (shape, dtype) in self.row_datasets().items():
            contiguous_dataset(f, name, (n,) + tuple(shape), dtype)
        contiguous_dataset(f, "path_offsets", (n + 1,), np.int64)
        contiguous_dataset(f, "path_bytes", (len(self.path_table.data),), np.uint8)
        f["path_offsets"][...] = self.path_table.offsets
        f["path_bytes"][...] = self.path_table.data
        f.create_dataset("class_names", data=str_array(self.class_names))
        f.create_dataset("chunk_sha256", shape=(-(-n // self.hash_chunk_rows), 32), dtype=np.uint8)
        f.flush()
        return f

    def _check_batch(self, start: int, count: int) -> None:
        """Rows ``start .. start + count - 1`` may be written now (in order, inside the store, file open)."""
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected row {self.rows_written}, got {start}")
        if self._file is None:
            raise ValueError(f"{self.partial_path} is closed (reopen() it to go on writing)")
        if start + count > self.num_rows:
            raise ValueError(f"writing rows up to {start + count} into a store of {self.num_rows}")

    def _store_rows(self, start: int, arrays: Dict[str, np.ndarray]) -> None:
        """Write checked rows ``start ..`` (one array per :meth:`row_datasets` entry, already in the
        stored dtypes), hash them and record how far the file is written."""
        names = list(self.row_datasets())
        stop = start + len(arrays[names[0]])
        for name in names:
            self._file[name][start:stop] = arrays[name]
        self._hash_rows(start, row_bytes(*(arrays[name] for name in names)))
        self._file.attrs["rows_written"] = stop
        self._file.flush()
        self._rows_written = stop

    def _hash_rows(self, start: int, data: np.ndarray) -> None:
        """Feed rows ``start ..`` into the block hashes, recording each block as it completes."""
        row, size = start, self.hash_chunk_rows
        while len(data):
            chunk = row // size
            take = min(len(data), (chunk + 1) * size - row)
            self._chunk.update(data[:take].tobytes())
            row, data = row + take, data[take:]
            if row % size == 0 or row == self.num_rows:
                self._file["chunk_sha256"][chunk] = np.frombuffer(self._chunk.digest(), np.uint8)
                self._chunk = hashlib.sha256()

    def finish(self) -> str:
        """Record the content hash, mark complete, close and rename to the final path; returns it."""
        if self.rows_written != self.num_rows:
            raise ValueError(f"only {self.rows_written} of {self.num_rows} rows were written")
        self.reopen()
        f = self._file
        f.attrs["content_sha256"] = root_hash(f["chunk_sha256"][()], paths_digest(self.path_table),
                                              self.class_names, prefix=self._hash_prefix)
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


# -- reading --------------------------------------------------------------------------------------
def memmap_dataset(path: str, dataset, advice: Optional[int] = None) -> Optional[np.ndarray]:
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


def _identity(info: os.stat_result) -> tuple:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class RowFileReader:
    """The reading half every store kind shares (see the module docstring).

    A subclass sets :attr:`format_name`, :attr:`kind`, :attr:`big_datasets` (memory-mapped for random
    access, scanned sequentially) and :attr:`hashed_datasets` (the row bytes, in their hashed order),
    and implements :meth:`_validate_header` (with :meth:`_root_attrs` and :meth:`_check_datasets`)
    and :meth:`check_values`.
    """

    format_name = ""
    kind = "store"  #: what the kind is called in messages
    hash_prefix = b""
    big_datasets: Tuple[str, ...] = ()
    hashed_datasets: Tuple[str, ...] = ()

    def __init__(self, path, verify: str = "sample"):
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        path = os.fspath(path)
        self.url = path if is_remote(path) else None  #: where a fetched store came from
        self.path = self.fetch(path) if self.url else path
        self._pid = None
        self._file = None
        self._arrays = {}
        self._paths: Optional[PathTable] = None
        self._row_of_path = None
        self._identity = None  # (device, inode, size, mtime) of the file when this process opened it
        self._data_end = 0  # the end of the last byte of dataset storage the header declares
        if not os.path.exists(self.path):
            format_of(self.path)  # raises "no such store", with a hint at an interrupted write
        self.header = self._validate_header()
        self.class_names: List[str] = decode_strings(self._open()["class_names"])
        if verify in ("sample", "full"):
            self._verify_at_open(full=verify == "full")
        self.verified = verify  #: what was checked at open (one of :data:`VERIFY_LEVELS`)

    @classmethod
    def fetch(cls, url: str) -> str:
        """The local copy of the store at ``url`` (fetched once into the cache; a new download is kept
        only if every block matches the store's content hash and every value keeps the rules)."""
        def check(path: str) -> None:
            try:
                cls(path, verify="full").close()
            except StoreError as error:
                raise StoreError(url, f"the fetched copy is refused: {error.problem}") from None

        return cached_copy(url, check=check)

    # -- opening ---------------------------------------------------------------------------------
    def _open(self):
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork must not be used: open a fresh one in this process.
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as error:
                raise StoreError(self.path, f"cannot be opened as HDF5 ({error})") from None
            self._identity = _identity(os.fstat(self._file.id.get_vfd_handle()))
            self._pid = os.getpid()
            self._arrays = {}
            self._paths = None
        return self._file

    def _array(self, name: str):
        """Dataset ``name`` memory-mapped (random access), or the h5py dataset if it cannot be."""
        f = self._open()
        if name not in self._arrays:
            mapped = memmap_dataset(self.path, f[name], _RANDOM if name in self.big_datasets else None)
            self._arrays[name] = mapped if mapped is not None else f[name]
        return self._arrays[name]

    def _scan_arrays(self, names: Optional[Sequence[str]] = None) -> list:
        """The datasets ``names`` (default: :attr:`big_datasets`) mapped for one sequential pass."""
        f = self._open()
        names = self.big_datasets if names is None else names
        mapped = [memmap_dataset(self.path, f[name], _SEQUENTIAL) for name in names]
        return [m if m is not None else f[name] for m, name in zip(mapped, names)]

    def check_unchanged(self) -> None:
        """Raise :class:`StoreError` if the file changed since this process opened it: truncated
        (reading its mapped pages would kill the process with ``SIGBUS``), written to, or replaced.
        One ``fstat`` and one ``stat``: every batch read calls it first. (A truncation in the
        microseconds between this check and the copy of a batch is not caught.)"""
        if self._file is None or self._pid != os.getpid():
            return  # nothing mapped in this process yet: the next open records the file
        now = os.fstat(self._file.id.get_vfd_handle())
        if now.st_size < self._data_end:
            raise StoreError(self.path, f"was truncated to {now.st_size} bytes while it was read (its data ends at "
                                        f"byte {self._data_end}): another process is rewriting or cutting it")
        if _identity(now) != self._identity:
            raise StoreError(self.path, "changed while it was read (it was written to in place: its size or "
                                        "modification time differs from when it was opened); the labels read "
                                        "so far and those read next would not belong together: start again")
        try:
            named = os.stat(self.path)
        except OSError as error:
            raise StoreError(self.path, f"was removed while it was read ({error.strerror})") from None
        if (named.st_dev, named.st_ino) != self._identity[:2]:
            raise StoreError(self.path, "was replaced by another file while it was read; the labels read so far "
                                        "and those read next would not belong together: start again")

    def _root_attrs(self, readable_versions: Sequence[int]):
        """``(attrs, version)`` of a complete file of this kind, else :class:`StoreError`."""
        f = self._open()
        attrs = f.attrs
        if attrs.get("format") != self.format_name:
            raise StoreError(self.path, f"not a dali-relabel {self.kind} (format attribute is "
                                        f"{attrs.get('format')!r}, expected {self.format_name!r})")
        version = int(attrs.get("format_version", -1))
        if version not in readable_versions:
            raise StoreError(self.path, f"format version {version} is not supported (this reader "
                                        f"reads versions {', '.join(map(str, readable_versions))}); "
                                        "upgrade dali-relabel or convert the labels again")
        if not bool(attrs.get("complete", False)):
            raise StoreError(self.path, "the store is incomplete (its write was interrupted)")
        return attrs, version

    def _check_datasets(self, expected: Dict[str, tuple]) -> None:
        """Every dataset of ``expected`` (``{name: (shape or None, dtypes or None)}``) present, holding
        its own data within the file, of its shape and one of its dtypes."""
        f = self._open()
        for name in expected:
            if name not in f and f.get(name, getlink=True) is None:
                raise StoreError(self.path, f"dataset '{name}' is missing")
        link = f.get("class_ids", getlink=True)
        if link is not None and isinstance(link, h5py.HardLink) and isinstance(f["class_ids"], h5py.Dataset) \
                and f["class_ids"].dtype.kind not in "iu":
            raise StoreError(self.path, f"class_ids must be integers, found {f['class_ids'].dtype}")
        for name, (shape, dtypes) in expected.items():
            self._check_dataset_storage(f, name, None)  # links, storage and sizes before the shapes
            if shape is not None and f[name].shape != shape:
                raise StoreError(self.path, f"dataset '{name}' has shape {f[name].shape}, expected "
                                            f"{shape} from the header")
            self._check_dataset_storage(f, name, dtypes)

    def _check_dataset_storage(self, f, name: str, dtypes) -> None:
        """Dataset ``name`` must be a dataset of this file holding its own data (no link, external
        storage or virtual dataset), of one of ``dtypes``, stored within the file's size."""
        link = f.get(name, getlink=True)
        if link is None:
            raise StoreError(self.path, f"dataset '{name}' is missing")
        if isinstance(link, h5py.ExternalLink):
            raise StoreError(self.path, f"dataset '{name}' is a link to {link.filename}:{link.path}: a store "
                                        "must hold its data itself")
        if isinstance(link, h5py.SoftLink):
            raise StoreError(self.path, f"dataset '{name}' is a link to {link.path}: a store must hold its "
                                        "data under the format's names")
        dataset = f[name]
        if not isinstance(dataset, h5py.Dataset):
            raise StoreError(self.path, f"'{name}' is not a dataset")
        plist = dataset.id.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            raise StoreError(self.path, f"dataset '{name}' is a virtual dataset (its data lives in other "
                                        "files): a store must hold its data itself")
        if plist.get_external_count() > 0:
            raise StoreError(self.path, f"dataset '{name}' keeps its data in {plist.get_external_count()} "
                                        "external file(s): a store must hold its data itself")
        if dtypes is not None and dataset.dtype not in dtypes:
            raise StoreError(self.path, f"dataset '{name}' has dtype {dataset.dtype}, expected "
                                        f"{' or '.join(str(d) for d in dtypes)}")
        declared = int(dataset.size) * dataset.dtype.itemsize
        if declared == 0:
            return
        file_size = os.fstat(f.id.get_vfd_handle()).st_size
        rows = f"{dataset.shape[0]} rows" if dataset.ndim else "a value"
        offset = dataset.id.get_offset() if plist.get_layout() == h5py.h5d.CONTIGUOUS else None
        stored = dataset.id.get_storage_size()
        if stored == 0:
            raise StoreError(self.path, f"dataset '{name}' declares {rows} ({declared} bytes) but holds no data")
        if offset is not None:
            if offset + declared > file_size:
                raise StoreError(self.path, f"dataset '{name}' ends at byte {offset + declared}, but the file has "
                                            f"{file_size} bytes (it was truncated)")
            self._data_end = max(self._data_end, offset + declared)
        elif declared > MAX_COMPRESSION * stored + (1 << 20):
            raise StoreError(self.path, f"dataset '{name}' declares {rows} ({declared} bytes) in {stored} bytes "
                                        "of storage: more than any compression gives")

    def _validate_header(self):
        raise NotImplementedError

    def check_values(self) -> None:
        """Scan every row (sequentially); raise :class:`StoreError` naming the first bad row."""
        raise NotImplementedError

    # -- verification ----------------------------------------------------------------------------
    def _check_paths_and_labels(self) -> None:
        """The paths stay below the image root and the labels lie in ``[-1, num_classes)``."""
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

    def _verify_at_open(self, full: bool) -> None:
        """What ``verify="sample"`` (``full=False``) or ``"full"`` checks beyond the header."""
        self._check_paths_and_labels()
        if not self.header.values_checked or full:
            self.check_values()
        if full:
            self.verify_checksum()
            return
        self._check_root_hash()
        chunks = len(self._open()["chunk_sha256"])
        self.verify_checksum(chunks=[int(np.random.default_rng().integers(chunks))])

    def _check_root_hash(self) -> None:
        recorded = self._open()["chunk_sha256"][()]
        if root_hash(recorded, paths_digest(self.paths), self.class_names,
                     prefix=self.hash_prefix) != self.header.content_sha256:
            raise StoreError(self.path, "content checksum mismatch in the image paths, class names or "
                                        "recorded hashes (the file was changed or damaged after it was written)")

    def verify_checksum(self, chunks: Optional[Sequence[int]] = None) -> None:
        """Recompute the content hash (every block, or the blocks ``chunks``) and compare it with
        what the writer recorded; raise :class:`StoreError` on a mismatch."""
        f = self._open()
        recorded = f["chunk_sha256"][()]
        if chunks is None:
            self._check_root_hash()
            chunks = range(len(recorded))
        scanned = dict(zip(self.big_datasets, self._scan_arrays()))
        arrays = [scanned[name] if name in scanned else self._array(name) for name in self.hashed_datasets]
        rows = int(f.attrs["hash_chunk_rows"])
        for chunk in chunks:
            start, stop = chunk * rows, min(len(self), (chunk + 1) * rows)
            data = row_bytes(*(np.asarray(a[start:stop]) for a in arrays))
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
    def class_ids_dtype(self) -> np.dtype:
        """The dtype the class ids are stored in (uint8 up to 256 classes, then uint16, int32)."""
        return np.dtype(self._open()["class_ids"].dtype)

    @property
    def paths(self) -> PathTable:
        """Every row's image path relative to the image root (memory-mapped)."""
        self._open()
        if self._paths is None:
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

    def _rows_index(self, rows) -> np.ndarray:
        """``rows`` as int64, each checked to lie in the store."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)}) requested")
        return rows

    def row_of(self, relpath: str) -> int:
        """The row of image ``relpath`` (``KeyError`` if there is none)."""
        if self._row_of_path is None:
            self._row_of_path = {p: i for i, p in enumerate(self.paths.tolist())}
        return self._row_of_path[normalise_relpath(relpath)]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._arrays = {}
        self._paths = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_file=None, _arrays={}, _paths=None, _pid=None, _row_of_path=None, _identity=None)
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def summary_rows(store: RowFileReader, sample_rows: int, seed: int) -> np.ndarray:
    """Sorted random rows of ``store`` (at most ``sample_rows``), for a summary's statistics."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(store), size=min(sample_rows, len(store)), replace=False))


def summary_header(store: RowFileReader) -> dict:
    """What a summary of any store kind starts with: the file, its version, counts and provenance."""
    h = store.header
    size_bytes = os.path.getsize(store.path)
    return {"path": store.path, "format_version": h.format_version, "rows": h.num_rows,
            "num_classes": h.num_classes, "teacher": h.teacher, "teacher_input_size": h.teacher_input_size,
            "source": h.source, "content_sha256": h.content_sha256, "values_checked_when_written": h.values_checked,
            "file_bytes": size_bytes, "bytes_per_image": size_bytes / max(1, h.num_rows),
            "class_ids_dtype": str(store.class_ids_dtype)}
