"""The HDF5 label-map store: writer, reader and open-time validation.

The format (version 1) is specified in ``docs/store_format.md``. In short: one file, one row per
image, ``logits [N, k, H, W]`` float16 and ``class_ids [N, k, H, W]`` (smallest unsigned type that
holds ``num_classes``), plus each row's relative image path, hard label, image size, and the class
names. Readers map the two big arrays into memory, so gathering a batch of random rows costs one
numpy fancy-index, and they open the file lazily in each process, so a store object can be handed to
DALI workers and DDP ranks before or after ``fork``.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import h5py
import numpy as np

FORMAT_NAME = "dali-relabel-label-store"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_HASH_CHUNK_ROWS = 8192


class StoreError(ValueError):
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


def content_hash(logits, class_ids, labels, image_sizes, paths: Sequence[str]) -> str:
    """SHA-256 of a store's arrays in row order (array-likes are read in chunks)."""
    digest = hashlib.sha256()
    n = len(paths)
    for start in range(0, n, _HASH_CHUNK_ROWS):
        stop = min(n, start + _HASH_CHUNK_ROWS)
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


def map_value_problem(logits: np.ndarray, class_ids: np.ndarray, num_classes: int):
    """``None`` if every class id of a batch of maps ``[n, k, H, W]`` lies in ``[0, num_classes)`` and
    every logit is finite, else ``(sample index, what is wrong)`` for the first bad sample."""
    n = len(logits)
    bad_ids = ((class_ids < 0) | (class_ids >= num_classes)).reshape(n, -1)
    bad_logits = ~np.isfinite(logits).reshape(n, -1)
    if not (bad_ids.any() or bad_logits.any()):
        return None
    first = int(np.flatnonzero(bad_ids.any(axis=1) | bad_logits.any(axis=1))[0])
    if bad_ids[first].any():
        value = class_ids.reshape(n, -1)[first][bad_ids[first]][0]
        return first, f"class id {int(value)} is outside [0, {num_classes})"
    position = int(np.flatnonzero(bad_logits[first])[0])
    index = tuple(int(i) for i in np.unravel_index(position, logits.shape[1:]))
    return first, f"logit at index {index} is {logits[first][index]} (not finite)"


def check_map_values(logits: np.ndarray, class_ids: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if class ids are out of range or logits not finite
    (``logits``/``class_ids`` of one map ``[k, H, W]`` or a batch ``[n, k, H, W]``)."""
    batch = logits.ndim == 4
    problem = map_value_problem(logits if batch else logits[None], class_ids if batch else class_ids[None],
                                num_classes)
    if problem is not None:
        index, what = problem
        raise ValueError(f"{where}{f' (map {index})' if batch else ''}: {what}")


class StoreWriter:
    """Writes a store row by row, in a fixed order, to ``<out>.partial``; renames it when complete.

    Args:
        path: the final store path.
        paths: relative image path of every row, in row order (fixes N and the row order).
        num_classes, k, grid_h, grid_w: map geometry.
        layout: ``"HW"`` (geometric) or ``"WH"`` (the authors' transposed convention).
        class_names: ``num_classes`` names in class-id order.
        teacher, teacher_input_size, source: provenance, stored as attributes.
        resume: continue an interrupted ``<out>.partial`` written for the same plan.
        plan_salt: what else decides the data (e.g. the source directory of the maps); a partial
            file written with another salt is started again rather than resumed.

    Rows are written with :meth:`write` in order; :attr:`rows_written` says where to continue after
    a resume. :meth:`finish` computes the checksum and publishes the file.
    """

    def __init__(self, path, paths: Sequence[str], num_classes: int, k: int, grid_h: int,
                 grid_w: int, layout: str, class_names: Sequence[str], teacher: str = "",
                 teacher_input_size: int = 0, source: str = "", resume: bool = True,
                 plan_salt: str = ""):
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
        self.num_classes = int(num_classes)
        self.map_shape = (int(k), int(grid_h), int(grid_w))
        self.ids_dtype = class_id_dtype(num_classes)
        attrs = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, num_rows=self.num_rows,
                     num_classes=self.num_classes, k=int(k), grid_h=int(grid_h), grid_w=int(grid_w),
                     layout=layout, teacher=str(teacher), teacher_input_size=int(teacher_input_size),
                     source=str(source))
        self._plan = plan_hash(self.paths, {**attrs, "class_names": list(class_names), "salt": plan_salt})
        self._file = None
        if resume and os.path.exists(self.partial_path):
            self._file = self._try_resume()
        if self._file is None:
            self._file = self._create(attrs, class_names)

    @property
    def rows_written(self) -> int:
        return int(self._file.attrs["rows_written"])

    def _try_resume(self):
        try:
            f = h5py.File(self.partial_path, "r+")
        except OSError:
            return None  # an unreadable partial file is simply started again
        if f.attrs.get("plan_sha256") != self._plan:
            f.close()
            return None
        return f

    def _create(self, attrs: dict, class_names: Sequence[str]):
        f = h5py.File(self.partial_path, "w")
        f.attrs.update(attrs)
        f.attrs["complete"] = False
        f.attrs["rows_written"] = 0
        f.attrs["plan_sha256"] = self._plan
        n, shape = self.num_rows, self.map_shape
        # Contiguous, uncompressed and allocated up front, so readers can memory-map them.
        for name, dtype in (("logits", np.float16), ("class_ids", self.ids_dtype)):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            space = h5py.h5s.create_simple((n,) + shape)
            h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
        f.create_dataset("labels", shape=(n,), dtype=np.int32, fillvalue=-1)
        f.create_dataset("image_sizes", shape=(n, 2), dtype=np.int32, fillvalue=0)
        f.create_dataset("paths", data=_str_array(self.paths))
        f.create_dataset("class_names", data=_str_array(class_names))
        f.flush()
        return f

    def write(self, start: int, logits: np.ndarray, class_ids: np.ndarray,
              labels: Optional[np.ndarray] = None, image_sizes: Optional[np.ndarray] = None) -> None:
        """Write rows ``start .. start + len(logits) - 1``; ``start`` must equal :attr:`rows_written`."""
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected row {self.rows_written}, got {start}")
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
        check_map_values(logits, class_ids, self.num_classes, f"rows {start}..{start + count - 1}")
        stop = start + count
        f = self._file
        f["logits"][start:stop] = logits
        f["class_ids"][start:stop] = class_ids.astype(self.ids_dtype)
        if labels is not None:
            f["labels"][start:stop] = np.asarray(labels, dtype=np.int32)
        if image_sizes is not None:
            f["image_sizes"][start:stop] = np.asarray(image_sizes, dtype=np.int32).reshape(count, 2)
        f.attrs["rows_written"] = stop
        f.flush()

    def finish(self) -> str:
        """Checksum, mark complete, close and rename to the final path; returns that path."""
        if self.rows_written != self.num_rows:
            raise ValueError(f"only {self.rows_written} of {self.num_rows} rows were written")
        f = self._file
        f.attrs["content_sha256"] = content_hash(f["logits"], f["class_ids"], f["labels"],
                                                 f["image_sizes"], self.paths)
        f.attrs["complete"] = True
        f.close()
        self._file = None
        os.replace(self.partial_path, self.path)
        return self.path

    def close(self) -> None:
        """Close without publishing (the partial file stays, resumable)."""
        if self._file is not None:
            self._file.close()
            self._file = None

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


def _memmap_dataset(path: str, dataset) -> Optional[np.ndarray]:
    """A read-only memory map of a contiguous, uncompressed, allocated dataset, else ``None``."""
    if dataset.chunks is not None or dataset.compression is not None or dataset.size == 0:
        return None
    offset = dataset.id.get_offset()
    if offset is None:
        return None
    array = np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
    raw = getattr(array, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
        # Rows are read in random order: read-around would fetch pages nobody asked for.
        raw.madvise(mmap.MADV_RANDOM)
    return array


class LabelStore:
    """Read access to a store, validated at open.

    Args:
        path: the store file.
        check_values: scan every class id and logit at open (range and finiteness). Costs one pass
            over the arrays; processes that reopen a store already checked by their parent pass
            ``False`` (the per-row checks of :meth:`read_checked` still apply).

    The HDF5 handle is opened lazily and reopened after ``fork``, so the object is safe to pickle and
    to share with worker processes. Small per-row metadata (paths, labels, sizes, names) is loaded
    into memory at open.
    """

    def __init__(self, path, check_values: bool = True):
        self.path = os.fspath(path)
        self._pid = None
        self._file = None
        self._logits = None
        self._class_ids = None
        if not os.path.exists(self.path):
            hint = ""
            if os.path.exists(self.path + PARTIAL_SUFFIX):
                hint = (f" ({self.path + PARTIAL_SUFFIX} exists: the write was interrupted; rerun the "
                        "same command to resume it)")
            raise StoreError(self.path, "no such store" + hint)
        self.header = self._validate_header()
        f = self._handle()
        self.paths: List[str] = _decode_strings(f["paths"])
        self.class_names: List[str] = _decode_strings(f["class_names"])
        self.labels: np.ndarray = f["labels"][()]
        self.image_sizes: np.ndarray = f["image_sizes"][()]
        self._row_of_path = None
        if check_values:
            self.check_values()

    # -- opening ---------------------------------------------------------------------------------
    def _open(self):
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork must not be used: open a fresh one in this process.
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as error:
                raise StoreError(self.path, f"cannot be opened as HDF5 ({error})") from None
            self._pid = os.getpid()
            self._logits = self._class_ids = None
        return self._file

    def _handle(self):
        """The open file, with ``_logits``/``_class_ids`` mapped (header already validated)."""
        self._open()
        if self._logits is None:
            self._logits = _memmap_dataset(self.path, self._file["logits"])
            self._class_ids = _memmap_dataset(self.path, self._file["class_ids"])
            if self._logits is None:
                self._logits = self._file["logits"]
            if self._class_ids is None:
                self._class_ids = self._file["class_ids"]
        return self._file

    def _validate_header(self) -> StoreHeader:
        f = self._open()
        attrs = f.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(self.path, f"not a dali-relabel label store (format attribute is "
                                        f"{attrs.get('format')!r})")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise StoreError(self.path, f"format version {version} is not supported (this reader "
                                        f"reads version {FORMAT_VERSION}); upgrade dali-relabel or "
                                        "reconvert the maps")
        if not bool(attrs.get("complete", False)):
            raise StoreError(self.path, "the store is incomplete (its write was interrupted)")
        try:
            header = StoreHeader(
                num_rows=int(attrs["num_rows"]), num_classes=int(attrs["num_classes"]),
                k=int(attrs["k"]), grid_h=int(attrs["grid_h"]), grid_w=int(attrs["grid_w"]),
                layout=str(attrs["layout"]), teacher=str(attrs.get("teacher", "")),
                teacher_input_size=int(attrs.get("teacher_input_size", 0)),
                source=str(attrs.get("source", "")),
                content_sha256=str(attrs.get("content_sha256", "")))
        except KeyError as missing:
            raise StoreError(self.path, f"header attribute {missing} is missing") from None
        if header.layout not in ("HW", "WH"):
            raise StoreError(self.path, f"layout {header.layout!r} is neither 'HW' nor 'WH'")
        n, map_shape = header.num_rows, header.map_shape
        expected = {
            "logits": ((n,) + map_shape, [np.dtype(np.float16), np.dtype(np.float32)]),
            "class_ids": ((n,) + map_shape, None),
            "paths": ((n,), None),
            "labels": ((n,), None),
            "image_sizes": ((n, 2), None),
            "class_names": ((header.num_classes,), None),
        }
        for name, (shape, dtypes) in expected.items():
            if name not in f:
                raise StoreError(self.path, f"dataset '{name}' is missing")
            if f[name].shape != shape:
                raise StoreError(self.path, f"dataset '{name}' has shape {f[name].shape}, expected "
                                            f"{shape} from the header")
            if dtypes is not None and f[name].dtype not in dtypes:
                raise StoreError(self.path, f"dataset '{name}' has dtype {f[name].dtype}")
        if f["class_ids"].dtype.kind not in "iu":
            raise StoreError(self.path, f"class_ids must be integers, found {f['class_ids'].dtype}")
        return header

    def check_values(self) -> None:
        """Scan all class ids and logits; raise :class:`StoreError` naming the first bad row."""
        self._handle()
        n = self.header.num_rows
        for start in range(0, n, _HASH_CHUNK_ROWS):
            stop = min(n, start + _HASH_CHUNK_ROWS)
            logits = np.asarray(self._logits[start:stop])
            ids = np.asarray(self._class_ids[start:stop])
            bad_ids = (ids < 0) | (ids >= self.header.num_classes)
            bad_logits = ~np.isfinite(logits)
            for bad, what in ((bad_ids, "a class id outside [0, %d)" % self.header.num_classes),
                              (bad_logits, "a non-finite logit")):
                if bad.any():
                    row = start + int(np.argwhere(bad.reshape(len(bad), -1).any(axis=1))[0, 0])
                    raise StoreError(self.path, f"row {row} ({self.paths[row]}) has {what}")

    def verify_checksum(self) -> None:
        """Recompute the content hash and compare it with the header (reads the whole store)."""
        f = self._handle()
        actual = content_hash(self._logits, self._class_ids, f["labels"], f["image_sizes"], self.paths)
        if actual != self.header.content_sha256:
            raise StoreError(self.path, f"content checksum mismatch (stored "
                                        f"{self.header.content_sha256[:12]}, actual {actual[:12]})")

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.header.num_rows

    @property
    def num_classes(self) -> int:
        return self.header.num_classes

    @property
    def layout(self) -> str:
        return self.header.layout

    def read(self, rows) -> LabelMap:
        """Maps of ``rows`` (an int or a sequence): ``logits [n, k, H, W]``, ``class_ids [n, k, H, W]``."""
        self._handle()
        if np.isscalar(rows):
            row = int(rows)
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} is outside the store's {len(self)} rows")
            return LabelMap(np.asarray(self._logits[row]), np.asarray(self._class_ids[row]))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside [0, {len(self)}) requested")
        if isinstance(self._logits, np.ndarray):
            return LabelMap(self._logits[rows], self._class_ids[rows])
        # h5py needs increasing indices: read sorted unique rows, then restore the order.
        unique, inverse = np.unique(rows, return_inverse=True)
        return LabelMap(self._logits[unique][inverse], self._class_ids[unique][inverse])

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
            self._row_of_path = {p: i for i, p in enumerate(self.paths)}
        return self._row_of_path[_normalise_relpath(relpath)]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._logits = self._class_ids = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_file=None, _logits=None, _class_ids=None, _pid=None)
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        h = self.header
        return (f"LabelStore({self.path!r}, rows={h.num_rows}, classes={h.num_classes}, "
                f"k={h.k}, grid={h.grid_h}x{h.grid_w}, layout={h.layout})")


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
        "path": store.path, "format_version": FORMAT_VERSION, "rows": h.num_rows,
        "num_classes": h.num_classes, "k": h.k, "grid": [h.grid_h, h.grid_w], "layout": h.layout,
        "teacher": h.teacher, "teacher_input_size": h.teacher_input_size, "source": h.source,
        "content_sha256": h.content_sha256, "file_bytes": size_bytes,
        "bytes_per_image": size_bytes / max(1, h.num_rows),
        "class_ids_dtype": str(store._class_ids.dtype), "memory_mapped": isinstance(store._logits, np.ndarray),
        "sampled_rows": int(len(rows)),
        "logit_mean": float(logits.mean()), "logit_min": float(logits.min()), "logit_max": float(logits.max()),
        "top1_logit_mean": float(logits[:, 0].mean()),
        "hard_label_known": float(known.mean()),
        "majority_top1_equals_hard_label": agree,
        "distinct_classes_in_sample": int(len(np.unique(maps.class_ids))),
    }
