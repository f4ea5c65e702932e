"""The region store's format in code: constants, header, label types and the rules every row keeps
(``docs/store_format.md``, "The region store"), shared by its writer and reader.

A region store holds, per image, R stored crops: each crop's box in source pixels, its flip and the
teacher's top-k class ids and probabilities for exactly that crop (FKD's soft labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

REGION_FORMAT_NAME = "dali-relabel-region-store"
REGION_FORMAT_VERSION = 1
REGION_READABLE_VERSIONS = (1,)
REGION_HASH_PREFIX = b"dali-relabel-region-store/1\0"
REGION_HASH_CHUNK_ROWS = 256  # rows per recorded SHA-256: ~4.6 MB at 500 crops of top-5 labels

#: How a dense ``[C]`` target is recovered from a crop's top-k ``(class_ids, values)``:
#:
#: * ``marginal_smoothing`` (FKD's ``marginal_smoothing_k5``/``_k10``, and ``hard``/``smoothing`` as
#:   k = 1): the top-k classes get their stored probability, the mass left, ``1 - sum(values)``, is
#:   spread evenly over the other ``C - k`` classes;
#: * ``marginal_renorm`` (FKD's ``marginal_renorm``): the top-k probabilities divided by their sum,
#:   every other class 0.
LABEL_TYPES = ("marginal_smoothing", "marginal_renorm")
#: A crop's top-k probabilities may sum to at most ``1 + PROB_TOLERANCE`` (float16 rounding of k
#: values summing to 1 stays below 2**-11), and with k = C must sum to 1 within it.
PROB_TOLERANCE = 1e-3
#: A box may end this many pixels past its image's edge (float32 fractions times the size).
BOX_TOLERANCE = 1e-2
#: The stored dtypes of the probabilities.
VALUE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass(frozen=True)
class RegionHeader:
    """The root attributes of a region store."""

    num_rows: int
    num_classes: int
    regions: int  #: R, stored crops per image
    k: int  #: top-k labels per crop
    label_type: str  #: one of :data:`LABEL_TYPES`
    teacher: str = ""
    teacher_input_size: int = 0
    source: str = ""
    content_sha256: str = ""
    format_version: int = REGION_FORMAT_VERSION
    values_checked: bool = False


def region_value_problem(boxes: np.ndarray, flips: np.ndarray, class_ids: np.ndarray, values: np.ndarray,
                         image_sizes: np.ndarray, num_classes: int,
                         label_type: str) -> Optional[Tuple[int, str]]:
    """``None`` if a batch of rows keeps the format's rules, else ``(index of the first bad row, what
    is wrong, naming the crop)``.

    Args: ``boxes [n, R, 4]`` (x0, y0, w, h) in source pixels, ``flips [n, R]``, ``class_ids [n, R, k]``,
    ``values [n, R, k]`` (as stored), ``image_sizes [n, 2]`` (height, width).

    The rules: every box and value finite; a box inside its image (``x0, y0 >= 0``, ``w, h > 0``, its
    far edges at most :data:`BOX_TOLERANCE` px past the image's); flips 0 or 1; class ids in
    ``[0, num_classes)`` and distinct within a crop; probabilities in ``[0, 1]`` summing to at most
    ``1 + PROB_TOLERANCE`` (exactly 1 within it when k = C; above 0 for ``marginal_renorm``).
    """
    n = len(boxes)
    if n == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64)
    values64 = np.asarray(values, dtype=np.float64)
    sizes = np.asarray(image_sizes, dtype=np.float64)
    k = class_ids.shape[-1]
    checks = []  # (bad [n, R], message of row i crop j)
    finite = np.isfinite(boxes).all(axis=-1)
    checks.append((~finite, lambda i, j: f"box {_box(boxes[i, j])} is not finite"))
    x0, y0, w, h = (boxes[..., c] for c in range(4))
    height, width = sizes[:, 0:1], sizes[:, 1:2]
    outside = finite & ((x0 < 0) | (y0 < 0) | (w <= 0) | (h <= 0) | (x0 + w > width + BOX_TOLERANCE)
                        | (y0 + h > height + BOX_TOLERANCE))
    checks.append((outside, lambda i, j: f"box {_box(boxes[i, j])} (x0, y0, w, h) is not inside its "
                                         f"{int(sizes[i, 1])}x{int(sizes[i, 0])} (WxH) image"))
    flips = np.asarray(flips)
    checks.append(((flips != 0) & (flips != 1), lambda i, j: f"flip flag {flips[i, j]} is neither 0 nor 1"))
    ids = np.asarray(class_ids).astype(np.int64)
    bad_ids = ((ids < 0) | (ids >= num_classes)).any(axis=-1)
    checks.append((bad_ids, lambda i, j: f"class ids {ids[i, j].tolist()} are not all in [0, {num_classes})"))
    ordered = np.sort(ids, axis=-1)
    checks.append(((ordered[..., 1:] == ordered[..., :-1]).any(axis=-1),
                   lambda i, j: f"class ids {ids[i, j].tolist()} repeat a class (a top-k names each once)"))
    checks.append((~np.isfinite(values64).all(axis=-1),
                   lambda i, j: f"probabilities {values64[i, j].tolist()} are not all finite"))
    finite_values = np.isfinite(values64).all(axis=-1)
    checks.append((finite_values & ((values64 < 0) | (values64 > 1)).any(axis=-1),
                   lambda i, j: f"probabilities {values64[i, j].tolist()} are not all in [0, 1]"))
    total = values64.sum(axis=-1)
    checks.append((finite_values & (total > 1 + PROB_TOLERANCE),
                   lambda i, j: f"probabilities sum to {total[i, j]:.6g}, more than 1 (tolerance {PROB_TOLERANCE})"))
    if k == num_classes:
        checks.append((finite_values & (np.abs(total - 1) > PROB_TOLERANCE),
                       lambda i, j: f"probabilities of all {k} classes sum to {total[i, j]:.6g}, not 1 "
                                    f"(tolerance {PROB_TOLERANCE})"))
    if label_type == "marginal_renorm":
        checks.append((finite_values & (total <= 0),
                       lambda i, j: "probabilities sum to 0: nothing to renormalise (marginal_renorm)"))
    first = None
    for bad, message in checks:
        rows = np.flatnonzero(bad.any(axis=1))
        if len(rows) and (first is None or rows[0] < first[0]):
            i = int(rows[0])
            first = (i, message, int(np.flatnonzero(bad[i])[0]))
    if first is None:
        return None
    i, message, j = first
    return i, f"crop {j}: {message(i, j)}"


def _box(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"
