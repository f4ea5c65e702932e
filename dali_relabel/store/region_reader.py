"""Reading a region store: validated at open as the map store is (the shared
:class:`~dali_relabel.store.rowfile.RowFileReader`), read a batch at a time, with the keyed choice of
stored crops and the dense targets a loader needs (:mod:`~dali_relabel.store.region_targets`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .format import SCAN_ROWS, StoreError, class_id_dtype
from .region_format import (LABEL_TYPES, REGION_FORMAT_NAME, REGION_HASH_PREFIX, REGION_READABLE_VERSIONS,
                            RegionHeader, region_value_problem)
from .region_targets import dense_targets, select_regions
from .rowfile import RowFileReader, summary_header, summary_rows


@dataclass
class RegionLabels:
    """Stored crops of a batch of rows: ``boxes [n, c, 4]`` float32 (x0, y0, w, h) in source pixels,
    ``flips [n, c]`` uint8, ``class_ids [n, c, k]`` and ``values [n, c, k]`` (probabilities), where
    ``c`` is R (every stored crop) or the number of crops selected per row."""

    boxes: np.ndarray
    flips: np.ndarray
    class_ids: np.ndarray
    values: np.ndarray


class RegionStore(RowFileReader):
    """Read access to a region store, validated at open.

    Args:
        path: the store file (or an ``s3://`` URL, fetched and checked as a map store is).
        verify: ``"header"`` (format, version, completeness, every dataset's shape, dtype and
            storage), ``"sample"`` (default: also the paths, labels and image sizes, the root hash
            and one random block's hash) or ``"full"`` (every block's hash and every value).

    What a loader uses: ``len(store)``, :attr:`num_classes`, :attr:`regions` (R), :attr:`k`,
    :attr:`label_type`, :attr:`paths` / :meth:`row_of`, :attr:`labels`, :attr:`image_sizes`;
    :meth:`select` (which stored crops a row uses in an epoch, keyed), :meth:`read` (the stored crops
    of a batch, one fancy-index per dataset) and :meth:`dense` (their ``[.., C]`` targets).
    """

    format_name = REGION_FORMAT_NAME
    kind = "region store"
    hash_prefix = REGION_HASH_PREFIX
    big_datasets = ("boxes", "flips", "class_ids", "values")
    hashed_datasets = ("boxes", "flips", "class_ids", "values", "labels", "image_sizes")

    def _validate_header(self) -> RegionHeader:
        attrs, version = self._root_attrs(REGION_READABLE_VERSIONS)
        try:
            header = RegionHeader(
                num_rows=int(attrs["num_rows"]), num_classes=int(attrs["num_classes"]),
                regions=int(attrs["regions"]), k=int(attrs["k"]), label_type=str(attrs["label_type"]),
                teacher=str(attrs.get("teacher", "")), teacher_input_size=int(attrs.get("teacher_input_size", 0)),
                source=str(attrs.get("source", "")), content_sha256=str(attrs.get("content_sha256", "")),
                format_version=version, values_checked=bool(attrs.get("values_checked", False)))
            chunk_rows = int(attrs["hash_chunk_rows"])
        except KeyError as missing:
            raise StoreError(self.path, f"header attribute {missing} is missing") from None
        except (TypeError, ValueError) as error:
            raise StoreError(self.path, f"a header attribute is not a number ({error})") from None
        if min(header.num_rows, header.num_classes, header.regions, header.k, chunk_rows) < 1 or \
                header.k > header.num_classes:
            raise StoreError(self.path, "a header attribute (num_rows, num_classes, regions, k, hash_chunk_rows) "
                                        "is out of range")
        if header.label_type not in LABEL_TYPES:
            raise StoreError(self.path, f"label_type {header.label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        n, r, k = header.num_rows, header.regions, header.k
        int32 = [np.dtype("<i4")]
        wide_ids = [d for d in (np.dtype("u1"), np.dtype("<u2"), np.dtype("<i4"))
                    if d.itemsize >= class_id_dtype(header.num_classes).itemsize]
        self._check_datasets({
            "boxes": ((n, r, 4), [np.dtype("<f4")]),
            "flips": ((n, r), [np.dtype("u1")]),
            "class_ids": ((n, r, k), wide_ids),
            "values": ((n, r, k), [np.dtype("<f2"), np.dtype("<f4")]),
            "labels": ((n,), int32),
            "image_sizes": ((n, 2), int32),
            "class_names": ((header.num_classes,), None),
            "path_offsets": ((n + 1,), [np.dtype(np.int64)]),
            "path_bytes": (None, [np.dtype(np.uint8)]),
            "chunk_sha256": ((-(-n // chunk_rows), 32), [np.dtype(np.uint8)]),
        })
        return header

    def check_values(self) -> None:
        """Scan every row (sequentially); raise :class:`StoreError` naming the first bad row and crop."""
        boxes, flips, class_ids, values = self._scan_arrays()
        sizes = self.image_sizes
        small = (sizes <= 0).any(axis=1)
        if small.any():
            row = int(np.flatnonzero(small)[0])
            raise StoreError(self.path, f"row {row} ({self.paths[row]}): image size {sizes[row].tolist()} "
                                        "(height, width) is not positive")
        for start in range(0, len(self), SCAN_ROWS):
            stop = min(len(self), start + SCAN_ROWS)
            problem = region_value_problem(np.asarray(boxes[start:stop]), np.asarray(flips[start:stop]),
                                           np.asarray(class_ids[start:stop]), np.asarray(values[start:stop]),
                                           np.asarray(sizes[start:stop]), self.num_classes, self.label_type)
            if problem is not None:
                row = start + problem[0]
                raise StoreError(self.path, f"row {row} ({self.paths[row]}), {problem[1]}")

    # -- reading ---------------------------------------------------------------------------------
    @property
    def regions(self) -> int:
        """R, the stored crops of every image."""
        return self.header.regions

    @property
    def k(self) -> int:
        """Labels kept per crop (top-k)."""
        return self.header.k

    @property
    def label_type(self) -> str:
        """How a dense target is recovered from a crop's top-k (see :func:`dense_targets`)."""
        return self.header.label_type

    def read(self, rows, crops: Optional[np.ndarray] = None) -> RegionLabels:
        """The stored crops of ``rows`` (int64 ``[n]``): all R of each (``crops=None``), or those of
        ``crops`` (int ``[n, c]``, crop indices per row, e.g. from :meth:`select`). One fancy-index
        per dataset, whatever ``n``."""
        arrays = [self._array(name) for name in self.big_datasets]
        self.check_unchanged()
        rows = self._rows_index(np.atleast_1d(rows))
        index = rows
        if crops is not None:
            crops = np.asarray(crops, dtype=np.int64)
            if crops.ndim != 2 or len(crops) != len(rows):
                raise ValueError(f"crops must be [n, c] for {len(rows)} rows, got shape {crops.shape}")
            if crops.size and (crops.min() < 0 or crops.max() >= self.regions):
                raise IndexError(f"crop indices outside [0, {self.regions}) requested")
            index = (rows[:, None], crops)
        if not isinstance(arrays[0], np.ndarray):  # h5py (a repacked file): read rows in increasing order
            unique, inverse = np.unique(rows, return_inverse=True)
            arrays = [np.asarray(a[unique])[inverse] for a in arrays]
            index = (np.arange(len(rows))[:, None], crops) if crops is not None else slice(None)
        return RegionLabels(*(np.asarray(a[index]) for a in arrays))

    def select(self, seed: int, epoch: int, rows, count: int) -> np.ndarray:
        """int64 ``[n, count]``: which ``count`` distinct stored crops each of ``rows`` uses in
        ``epoch`` (keyed by ``(seed, epoch, row)``, :func:`select_regions`)."""
        if count > self.regions:
            row = int(np.atleast_1d(rows)[0]) if np.size(rows) else 0
            raise StoreError(self.path, f"row {row} ({self.paths[row]}) has {self.regions} stored crops, fewer than "
                                        f"the {count} asked per image")
        return select_regions(seed, epoch, rows, count, self.regions)

    def dense(self, class_ids, values):
        """float32 torch ``[..., C]`` targets of top-k ``class_ids``/``values`` ``[..., k]`` per this
        store's :attr:`label_type` (:func:`dense_targets`)."""
        return dense_targets(class_ids, values, self.num_classes, self.label_type)

    def __repr__(self) -> str:
        h = self.header
        return (f"RegionStore({self.path!r}, rows={h.num_rows}, classes={h.num_classes}, regions={h.regions}, "
                f"k={h.k}, label_type={h.label_type}, version={h.format_version})")


def summarize_regions(store: RegionStore, sample_rows: int = 256, seed: int = 0) -> dict:
    """Header, counts and sanity statistics of a region store (from a random sample of rows)."""
    h = store.header
    rows = summary_rows(store, sample_rows, seed)
    sample = store.read(rows)
    values = sample.values.astype(np.float64)
    sizes = store.image_sizes[rows].astype(np.float64)
    area = (sample.boxes[..., 2] * sample.boxes[..., 3]) / (sizes[:, 0] * sizes[:, 1])[:, None]
    hard = store.labels[rows]
    known = hard >= 0
    top1 = sample.class_ids[..., 0].astype(np.int64)
    return {
        "kind": "region store", **summary_header(store), "regions": h.regions, "k": h.k,
        "label_type": h.label_type, "values_dtype": str(sample.values.dtype),
        "sampled_rows": int(len(rows)),
        "flipped_fraction": float(sample.flips.mean()),
        "crop_area_fraction_mean": float(area.mean()),
        "top1_probability_mean": float(values[..., 0].mean()),
        "topk_mass_mean": float(values.sum(axis=-1).mean()),
        "top1_equals_hard_label": float((top1[known] == hard[known][:, None]).mean()) if known.any() else float("nan"),
    }
