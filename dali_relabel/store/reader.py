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

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..config import LAYOUTS
from ..paths import PathTable
from .format import (FORMAT_NAME, HASH_CHUNK_ROWS, READABLE_VERSIONS, SCAN_ROWS, StoreError, StoreHeader,
                     check_map_values, class_id_dtype, content_hash_v1, decode_strings, map_value_problem)
from .rowfile import RowFileReader, summary_header, summary_rows


def fetch_store(url: str) -> str:
    """The local copy of the map store at ``url`` (:meth:`RowFileReader.fetch`)."""
    return LabelStore.fetch(url)


@dataclass
class LabelMap:
    """One image's label map: ``logits [k, H, W]`` and ``class_ids [k, H, W]``."""

    logits: np.ndarray
    class_ids: np.ndarray


def _id_dtypes(num_classes: int) -> list:
    """The class-id dtypes a store of ``num_classes`` may hold (the writer's, or a wider one)."""
    dtypes = [np.dtype("u1"), np.dtype("<u2"), np.dtype("<i4")]
    return [d for d in dtypes if d.itemsize >= class_id_dtype(num_classes).itemsize]


class LabelStore(RowFileReader):
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

    format_name = FORMAT_NAME
    kind = "label store"
    hash_prefix = b"dali-relabel-label-store/2\0"
    big_datasets = ("logits", "class_ids")
    hashed_datasets = ("logits", "class_ids", "labels", "image_sizes")

    def _validate_header(self) -> StoreHeader:
        attrs, version = self._root_attrs(READABLE_VERSIONS)
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
        self._check_datasets(expected)
        return header

    def _verify_at_open(self, full: bool) -> None:
        if self.header.format_version != 1:
            return super()._verify_at_open(full)
        self._check_paths_and_labels()
        self.check_values()  # a version-1 store records no checks
        if full:
            self.verify_checksum()

    # -- checks ----------------------------------------------------------------------------------
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
        super().verify_checksum(chunks)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        return self.header.layout

    @property
    def paths(self) -> PathTable:
        """Every row's image path relative to the image root (memory-mapped; version 1: decoded)."""
        if self.header.format_version != 1:
            return super().paths
        self._open()
        if self._paths is None:
            self._paths = PathTable.from_strings(decode_strings(self._file["paths"]))
        return self._paths

    def read(self, rows) -> LabelMap:
        """Maps of ``rows`` (an int or a sequence): ``logits [n, k, H, W]``, ``class_ids [n, k, H, W]``."""
        logits, class_ids = self._array("logits"), self._array("class_ids")
        self.check_unchanged()
        if np.isscalar(rows):
            row = int(rows)
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} is outside the store's {len(self)} rows")
            return LabelMap(np.asarray(logits[row]), np.asarray(class_ids[row]))
        rows = self._rows_index(rows)
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

    def __repr__(self) -> str:
        h = self.header
        return (f"LabelStore({self.path!r}, rows={h.num_rows}, classes={h.num_classes}, "
                f"k={h.k}, grid={h.grid_h}x{h.grid_w}, layout={h.layout}, version={h.format_version})")


def summarize(store: LabelStore, sample_rows: int = 1024, seed: int = 0) -> dict:
    """Header, counts and sanity statistics of a store (from a random sample of rows)."""
    h = store.header
    rows = summary_rows(store, sample_rows, seed)
    maps = store.read(rows)
    logits = maps.logits.astype(np.float32)
    top1 = maps.class_ids[:, 0].reshape(len(rows), -1)
    hard = store.labels[rows]
    known = hard >= 0
    agree = float(np.mean([np.bincount(t, minlength=h.num_classes).argmax() == y
                           for t, y in zip(top1[known], hard[known])])) if known.any() else float("nan")
    return {
        **summary_header(store), "k": h.k, "grid": [h.grid_h, h.grid_w], "layout": h.layout,
        "memory_mapped": isinstance(store._array("logits"), np.ndarray),
        "sampled_rows": int(len(rows)),
        "logit_mean": float(logits.mean()), "logit_min": float(logits.min()), "logit_max": float(logits.max()),
        "top1_logit_mean": float(logits[:, 0].mean()),
        "hard_label_known": float(known.mean()),
        "majority_top1_equals_hard_label": agree,
        "distinct_classes_in_sample": int(len(np.unique(maps.class_ids))),
    }
