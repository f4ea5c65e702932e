"""Writing a region store: row by row into ``<out>.partial``, every row checked and hashed as it
arrives, published by a durable rename once complete; one writer per output (``<out>.lock``). The
machinery is the map store's (:class:`~dali_relabel.store.rowfile.RowFileWriter`)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..outputs import OutputLock
from .format import StoreError, class_id_dtype
from .region_format import (LABEL_TYPES, REGION_FORMAT_NAME, REGION_FORMAT_VERSION, REGION_HASH_CHUNK_ROWS,
                            REGION_HASH_PREFIX, VALUE_DTYPES, region_value_problem)
from .rowfile import RowFileWriter


class RegionWriter(RowFileWriter):
    """Writes a region store row by row, in a fixed order, to ``<out>.partial``; renames it when complete.

    Args:
        path: the final store path.
        paths: relative image path of every row, in row order.
        num_classes: class ids lie in ``[0, num_classes)``.
        regions: R, stored crops per image (every row holds exactly R).
        k: top-k labels per crop.
        label_type: how a dense target is recovered (:data:`~dali_relabel.store.region_format.LABEL_TYPES`).
        class_names: ``num_classes`` names in class-id order.
        values_dtype: float16 (default) or float32 for the probabilities.
        teacher, teacher_input_size, source: provenance, stored as attributes.
        resume, plan_salt, lock: as :class:`~dali_relabel.store.StoreWriter`'s.

    Every batch is checked before anything of it is written
    (:func:`~dali_relabel.store.region_format.region_value_problem`, after the probabilities are cast
    to the stored dtype); a bad row raises :class:`~dali_relabel.store.StoreError` naming the store,
    the row, its image and the crop.
    """

    def __init__(self, path, paths: Sequence[str], num_classes: int, regions: int, k: int, label_type: str,
                 class_names: Sequence[str], values_dtype=np.float16, teacher: str = "", teacher_input_size: int = 0,
                 source: str = "", resume: bool = True, plan_salt: str = "", lock: Optional[OutputLock] = None):
        if label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for num_classes={num_classes}")
        if np.dtype(values_dtype) not in VALUE_DTYPES:
            raise ValueError(f"values_dtype must be float16 or float32, got {np.dtype(values_dtype)}")
        if not (regions >= 1 and 1 <= k <= num_classes):
            raise ValueError(f"a region store needs regions >= 1 and 1 <= k <= num_classes, got regions={regions}, "
                             f"k={k}, num_classes={num_classes}")
        self.num_classes, self.regions, self.k = int(num_classes), int(regions), int(k)
        self.label_type = label_type
        self.ids_dtype = class_id_dtype(num_classes)
        self.values_dtype = np.dtype(values_dtype)
        attrs = dict(format=REGION_FORMAT_NAME, format_version=REGION_FORMAT_VERSION, num_rows=len(paths),
                     num_classes=self.num_classes, regions=self.regions, k=self.k, label_type=label_type,
                     values_dtype=self.values_dtype.name, teacher=str(teacher),
                     teacher_input_size=int(teacher_input_size), source=str(source))
        super().__init__(path, paths, attrs, class_names, REGION_HASH_CHUNK_ROWS, REGION_HASH_PREFIX,
                         resume=resume, plan_salt=plan_salt, lock=lock)

    def row_datasets(self):
        r, k = self.regions, self.k
        return {"boxes": ((r, 4), np.float32), "flips": ((r,), np.uint8), "class_ids": ((r, k), self.ids_dtype),
                "values": ((r, k), self.values_dtype), "labels": ((), np.int32), "image_sizes": ((2,), np.int32)}

    def write(self, start: int, boxes, flips, class_ids, values, image_sizes, labels=None) -> None:
        """Write rows ``start .. start + n - 1`` (``start`` must equal :attr:`rows_written`).

        Args:
            boxes: ``[n, R, 4]`` (x0, y0, w, h) of each crop in source pixels.
            flips: ``[n, R]`` 1 where the crop was mirrored (bool or 0/1).
            class_ids: ``[n, R, k]`` the crop's top-k classes.
            values: ``[n, R, k]`` their probabilities.
            image_sizes: ``[n, 2]`` (height, width) of each image, both above 0.
            labels: ``[n]`` hard labels (default -1: unknown).
        """
        boxes, flips = np.asarray(boxes), np.asarray(flips)
        class_ids, values = np.asarray(class_ids), np.asarray(values)
        count = len(boxes)
        self._check_batch(start, count)
        r, k = self.regions, self.k
        for name, array, shape in (("boxes", boxes, (r, 4)), ("flips", flips, (r,)), ("class_ids", class_ids, (r, k)),
                                   ("values", values, (r, k))):
            where = f"rows {start}..{start + count - 1} (first: {self.paths[start]})"
            if array.ndim >= 2 and len(array) == count and array.shape[1] < r:
                raise StoreError(self.path, f"{where}: {name} of {array.shape[1]} stored crops per image, fewer "
                                            f"than the store's {r}")
            if array.shape != (count,) + shape:
                raise StoreError(self.path, f"{where}: {name} of shape {array.shape}, expected {(count,) + shape}")
        if class_ids.dtype.kind not in "iu":
            raise StoreError(self.path, f"rows {start}..{start + count - 1}: class ids must be integers, got "
                                        f"{class_ids.dtype}")
        sizes = np.asarray(image_sizes).reshape(count, 2).astype(np.int64)
        labels = (np.full(count, -1, np.int64) if labels is None else np.asarray(labels).astype(np.int64).reshape(count))
        self._check_rows(start, sizes, labels)
        with np.errstate(over="ignore", invalid="ignore"):
            stored_values = values.astype(self.values_dtype)
            stored_boxes = boxes.astype(np.float32)
        problem = region_value_problem(stored_boxes, flips, class_ids, stored_values, sizes, self.num_classes,
                                       self.label_type)
        if problem is not None:
            row = start + problem[0]
            raise StoreError(self.path, f"row {row} ({self.paths[row]}), {problem[1]}")
        self._store_rows(start, {"boxes": stored_boxes, "flips": flips.astype(np.uint8),
                                 "class_ids": class_ids.astype(self.ids_dtype), "values": stored_values,
                                 "labels": labels.astype(np.int32), "image_sizes": sizes.astype(np.int32)})

    def _check_rows(self, start: int, sizes: np.ndarray, labels: np.ndarray) -> None:
        """Image sizes above 0 and labels in ``[-1, num_classes)``, else a :class:`StoreError` naming the row."""
        for bad, what in (((sizes <= 0).any(axis=1) | (sizes > np.iinfo(np.int32).max).any(axis=1),
                           lambda i: f"image size {sizes[i].tolist()} (height, width) is not positive"),
                          ((labels < -1) | (labels >= self.num_classes),
                           lambda i: f"label {int(labels[i])} is outside [-1, {self.num_classes})")):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise StoreError(self.path, f"row {start + i} ({self.paths[start + i]}): {what(i)}")


def write_region_store(path, paths: Sequence[str], boxes, flips, class_ids, values, image_sizes, num_classes: int,
                       label_type: str = "marginal_smoothing", class_names: Optional[Sequence[str]] = None,
                       labels=None, values_dtype=np.float16, **provenance) -> str:
    """Write a whole region store from in-memory arrays (``boxes [N, R, 4]``, ``flips [N, R]``,
    ``class_ids``/``values [N, R, k]``, ``image_sizes [N, 2]``)."""
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    _, regions, k = np.shape(class_ids)
    with RegionWriter(path, paths, num_classes, regions, k, label_type, names, values_dtype=values_dtype,
                      resume=False, **provenance) as writer:
        writer.write(0, boxes, flips, class_ids, values, image_sizes, labels)
    return os.fspath(path)
