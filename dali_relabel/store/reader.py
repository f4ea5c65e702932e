"""Reading a store: validated at open (header, and a sample of the hashes by default), the big arrays,
paths and labels memory-mapped, the HDF5 handle reopened in each process.

A store is untrusted input. Before anything is read beyond the header, every dataset must hold its
own data in this file (no links, no external storage, no virtual datasets: those make HDF5 read other
files), with the dtype the format says, and within the file's size (so a small file declaring
billions of rows is refused before anything is allocated). While it is read, every batch first
checks (one ``fstat`` and one ``stat``) that the file is still the one opened: a store truncated
under the reader would kill the process with ``SIGBUS`` at the first mapped page past its end, and
one rewritten in place would switch the maps mid-epoch.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import h5py
import numpy as np

from ..config import LAYOUTS
from ..paths import PathTable
from ..remote import cached_copy, is_remote
from .format import (FORMAT_NAME, HASH_CHUNK_ROWS, PARTIAL_SUFFIX, READABLE_VERSIONS, SCAN_ROWS, VERIFY_LEVELS,
                     StoreError, StoreHeader, check_map_values, class_id_dtype, content_hash_v1, decode_strings,
                     map_value_problem, normalise_relpath, paths_digest, root_hash, row_bytes)


def fetch_store(url: str) -> str:
    """The local copy of the store at ``url`` (fetched once into the cache; a new download is kept
    only if every block matches the store's content hash and every value is in range)."""
    def check(path: str) -> None:
        try:
            LabelStore(path, verify="full").close()
        except StoreError as error:
            raise StoreError(url, f"the fetched copy is refused: {error.problem}") from None

    return cached_copy(url, check=check)


@dataclass
class LabelMap:
    """One image's label map: ``logits [k, H, W]`` and ``class_ids [k, H, W]``."""

    logits: np.ndarray
    class_ids: np.ndarray


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


def _identity(info: os.stat_result) -> tuple:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _id_dtypes(num_classes: int) -> list:
    """The class-id dtypes a store of ``num_classes`` may hold (the writer's, or a wider one)."""
    dtypes = [np.dtype("u1"), np.dtype("<u2"), np.dtype("<i4")]
    return [d for d in dtypes if d.itemsize >= class_id_dtype(num_classes).itemsize]


#: Compressed (chunked) datasets may declare at most this many times their stored bytes (gzip's
#: best ratio is about 1030:1).
MAX_COMPRESSION = 1100

_RANDOM = getattr(mmap, "MADV_RANDOM", None)  # batch reads: read-around would fetch unused pages
_SEQUENTIAL = getattr(mmap, "MADV_SEQUENTIAL", None)  # scans: read ahead


class LabelStore:
    """Read access to a store, validated at open.

    Args:
        path: the store file, or an ``s3://`` URL: the object is fetched once into the user's cache
            (:func:`dali_relabel.remote.cached_copy`; again when it changes), every block checked
            against the store's content hash before the copy is kept, and the copy is opened.
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
        path = os.fspath(path)
        self.url = path if is_remote(path) else None  #: where a fetched store came from
        self.path = fetch_store(path) if self.url else path
        self._pid = None
        self._file = None
        self._arrays = {}
        self._paths: Optional[PathTable] = None
        self._row_of_path = None
        self._identity = None  # (device, inode, size, mtime) of the file when this process opened it
        self._data_end = 0  # the end of the last byte of dataset storage the header declares
        if not os.path.exists(self.path):
            hint = ""
            if os.path.exists(self.path + PARTIAL_SUFFIX):
                hint = (f" ({self.path + PARTIAL_SUFFIX} exists: the write was interrupted; rerun the "
                        "same command to resume it)")
            raise StoreError(self.path, "no such store" + hint)
        self.header = self._validate_header()
        self.class_names: List[str] = decode_strings(self._open()["class_names"])
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
            self._identity = _identity(os.fstat(self._file.id.get_vfd_handle()))
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
                                        "modification time differs from when it was opened); the maps read "
                                        "so far and those read next would not belong together: start again")
        try:
            named = os.stat(self.path)
        except OSError as error:
            raise StoreError(self.path, f"was removed while it was read ({error.strerror})") from None
        if (named.st_dev, named.st_ino) != self._identity[:2]:
            raise StoreError(self.path, "was replaced by another file while it was read; the maps read so far "
                                        "and those read next would not belong together: start again")

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
        except (TypeError, ValueError) as error:
            raise StoreError(self.path, f"a header attribute is not a number ({error})") from None
        chunk_rows = attrs.get("hash_chunk_rows", HASH_CHUNK_ROWS)
        if min(header.num_rows, header.num_classes, header.k, header.grid_h, header.grid_w) < 0 or \
                not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise StoreError(self.path, "a header attribute (num_rows, num_classes, k, grid_h, grid_w, "
                                        "hash_chunk_rows) is out of range")
        if header.layout not in LAYOUTS:
            raise StoreError(self.path, f"layout {header.layout!r} is neither 'HW' nor 'WH'")
        n, map_shape = header.num_rows, header.map_shape
        int32 = [np.dtype("<i4")]
        expected = {
            "logits": ((n,) + map_shape, [np.dtype("<f2"), np.dtype("<f4")]),
            "class_ids": ((n,) + map_shape, _id_dtypes(header.num_classes)),
            "labels": ((n,), int32),
            "image_sizes": ((n, 2), int32),
            "class_names": ((header.num_classes,), None),
        }
        if version == 1:
            expected["paths"] = ((n,), None)
        else:
            expected["path_offsets"] = ((n + 1,), [np.dtype(np.int64)])
            expected["path_bytes"] = (None, [np.dtype(np.uint8)])
            expected["chunk_sha256"] = ((-(-n // int(chunk_rows)), 32), [np.dtype(np.uint8)])
        for name in expected:
            if name not in f and f.get(name, getlink=True) is None:
                raise StoreError(self.path, f"dataset '{name}' is missing")
        if f.get("class_ids", getlink=True) is not None and isinstance(f.get("class_ids", getlink=True),
                                                                        h5py.HardLink) \
                and isinstance(f["class_ids"], h5py.Dataset) and f["class_ids"].dtype.kind not in "iu":
            raise StoreError(self.path, f"class_ids must be integers, found {f['class_ids'].dtype}")
        for name, (shape, dtypes) in expected.items():
            self._check_dataset_storage(f, name, None)  # links, storage and sizes before the shapes
            if shape is not None and f[name].shape != shape:
                raise StoreError(self.path, f"dataset '{name}' has shape {f[name].shape}, expected "
                                            f"{shape} from the header")
            self._check_dataset_storage(f, name, dtypes)
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
        for start in range(0, n, SCAN_ROWS):
            stop = min(n, start + SCAN_ROWS)
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
    def class_ids_dtype(self) -> np.dtype:
        """The dtype the class ids are stored in (uint8 up to 256 classes, then uint16, int32)."""
        return np.dtype(self._open()["class_ids"].dtype)

    @property
    def paths(self) -> PathTable:
        """Every row's image path relative to the image root (memory-mapped)."""
        self._open()
        if self._paths is None:
            f = self._file
            if self.header.format_version == 1:
                self._paths = PathTable.from_strings(decode_strings(f["paths"]))
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
        self.check_unchanged()
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
