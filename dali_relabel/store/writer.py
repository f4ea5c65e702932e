"""Writing a store: row by row into ``<out>.partial``, every row checked and hashed as it arrives,
published by a durable rename once complete; one writer per output (``<out>.lock``)."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..config import LAYOUTS
from ..outputs import OutputLock
from .format import FORMAT_NAME, FORMAT_VERSION, HASH_CHUNK_ROWS, check_map_values, class_id_dtype
from .rowfile import RowFileWriter


class StoreWriter(RowFileWriter):
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
        self.num_classes = int(num_classes)
        self.map_shape = (int(k), int(grid_h), int(grid_w))
        self.ids_dtype = class_id_dtype(num_classes)
        attrs = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, num_rows=len(paths),
                     num_classes=self.num_classes, k=int(k), grid_h=int(grid_h), grid_w=int(grid_w),
                     layout=layout, teacher=str(teacher), teacher_input_size=int(teacher_input_size),
                     source=str(source))
        super().__init__(path, paths, attrs, class_names, HASH_CHUNK_ROWS, b"dali-relabel-label-store/2\0",
                         resume=resume, plan_salt=plan_salt, lock=lock)

    def row_datasets(self):
        return {"logits": (self.map_shape, np.float16), "class_ids": (self.map_shape, self.ids_dtype),
                "labels": ((), np.int32), "image_sizes": ((2,), np.int32)}

    def write(self, start: int, logits: np.ndarray, class_ids: np.ndarray,
              labels: Optional[np.ndarray] = None, image_sizes: Optional[np.ndarray] = None) -> None:
        """Write rows ``start .. start + len(logits) - 1``; ``start`` must equal :attr:`rows_written`.

        ``labels`` default to -1 (unknown), ``image_sizes`` to (0, 0).
        """
        logits = np.asarray(logits)
        class_ids = np.asarray(class_ids)
        count = len(logits)
        if logits.shape[1:] != self.map_shape or class_ids.shape != logits.shape:
            raise ValueError(f"maps of shape {logits.shape[1:]} / {class_ids.shape[1:]} do not match "
                             f"the store's (k, H, W) = {self.map_shape}")
        self._check_batch(start, count)
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
        self._store_rows(start, {"logits": logits, "class_ids": class_ids.astype(self.ids_dtype),
                                 "labels": labels, "image_sizes": sizes})


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
