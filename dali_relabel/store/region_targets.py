"""What a loader does with a region store's labels, a batch at a time: which stored crops each
sample uses in an epoch (:func:`select_regions`, keyed like every other draw of dali-relabel), the
whole-pixel window each stored box is cut with (:func:`pixel_windows`), and the dense ``[C]`` target
of a crop's stored top-k (:func:`dense_targets`, per the store's label type).
"""
from __future__ import annotations

import numpy as np

from ..crops import sample_keys, sample_uniforms
from .region_format import LABEL_TYPES

#: The keyed stream of the stored-crop choice (0-3: crop, colour jitter, interpolation, vertical
#: flip; 16.. and 64..: augmentation policies and random erasing, ``augment/randomness.py``).
REGION_STREAM = 96


def select_regions(seed: int, epoch: int, rows, count: int, regions: int) -> np.ndarray:
    """int64 ``[n, count]``: ``count`` distinct stored crops (of ``regions``) for each of ``rows`` in
    ``epoch``.

    Row ``r``'s choice follows from ``(seed, epoch, r)`` alone: stored crop ``j`` gets the uniform
    ``sample_uniforms(sample_keys(seed, epoch, [r]), REGION_STREAM, regions)[0, j]``
    (:mod:`dali_relabel.crops`), and the ``count`` crops with the smallest uniforms are taken, in
    increasing order of their uniforms (ties, which need two equal 53-bit draws, by crop index): a
    keyed random permutation's first ``count`` entries, as FKD's ``torch.randperm(R)[:count]``.
    Vectorised over the batch: one ``[n, regions]`` draw and one sort.
    """
    if not 1 <= count <= regions:
        raise ValueError(f"cannot choose {count} distinct crops of {regions} stored per image")
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    uniforms = sample_uniforms(sample_keys(seed, epoch, rows), REGION_STREAM, regions)
    return np.argsort(uniforms, axis=1, kind="stable")[:, :count].astype(np.int64)


def pixel_windows(boxes, image_sizes) -> np.ndarray:
    """int32 ``[..., 4]`` windows ``(y0, x0, h, w)`` in whole source pixels of stored ``boxes``
    ``[n, c, 4]`` (x0, y0, w, h, float source pixels) of images ``image_sizes`` ``[n, 2]`` (height, width).

    Each corner is rounded to the nearest pixel, halves to even (``x0 -> round(x0)``, ``x1 = x0 + w ->
    round(x1)``, as PIL's ``Image.crop`` rounds the float box FKD's ``RandomResizedCrop_FKD`` gives it),
    then clipped to the image, keeping at least one pixel: ``0 <= x0 < W`` and ``x0 < x1 <= W``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(len(boxes), *([1] * (boxes.ndim - 2)), 2)
    height, width = sizes[..., 0], sizes[..., 1]
    x0 = np.clip(np.rint(boxes[..., 0]), 0, width - 1)
    y0 = np.clip(np.rint(boxes[..., 1]), 0, height - 1)
    x1 = np.clip(np.rint(boxes[..., 0] + boxes[..., 2]), x0 + 1, width)
    y1 = np.clip(np.rint(boxes[..., 1] + boxes[..., 3]), y0 + 1, height)
    return np.stack([y0, x0, y1 - y0, x1 - x0], axis=-1).astype(np.int32)


def dense_targets(class_ids, values, num_classes: int, label_type: str):
    """float32 torch ``[..., C]`` targets of top-k ``class_ids`` and ``values`` (``[..., k]``, numpy
    or torch, probabilities), on the device of ``values`` if it is a tensor.

    * ``marginal_smoothing``: each stored class gets its value; each of the other ``C - k`` classes
      gets ``max(0, 1 - sum(values)) / (C - k)`` (nothing when k = C). FKD's
      ``Recover_soft_label`` for ``marginal_smoothing_k5``/``_k10``, and for ``hard`` and
      ``smoothing`` with k = 1.
    * ``marginal_renorm``: the stored values divided by their sum, every other class 0 (FKD's
      ``marginal_renorm``).
    """
    import torch

    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
    values = values if torch.is_tensor(values) else torch.from_numpy(np.ascontiguousarray(values))
    values = values.float()
    ids = class_ids if torch.is_tensor(class_ids) else torch.from_numpy(np.asarray(class_ids).astype(np.int64))
    ids = ids.to(device=values.device, dtype=torch.int64)
    k = values.shape[-1]
    total = values.sum(dim=-1, keepdim=True)
    if label_type == "marginal_renorm":
        base = torch.zeros(values.shape[:-1] + (num_classes,), dtype=torch.float32, device=values.device)
        return base.scatter_(-1, ids, values / total.clamp_min(1e-12))
    rest = (1 - total).clamp_min(0) / max(num_classes - k, 1) if num_classes > k else torch.zeros_like(total)
    base = rest.expand(values.shape[:-1] + (num_classes,)).contiguous()
    return base.scatter_(-1, ids, values)
