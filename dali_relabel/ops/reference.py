"""Reference LabelPooling: the ReLabel authors' semantics written plainly in PyTorch (the test oracle).

For each sample: scatter the top-k logits into a dense zero map ``[C, H, W]`` (classes outside the
top-k keep logit 0 and still take part in the softmax), RoIAlign it over the crop box with
``torchvision.ops.roi_align(output_size, sampling_ratio=-1, aligned=False)`` and the box scaled to the
grid and shifted by -0.5, mirror the pooled grid for flipped samples, and softmax over classes (in
float64, rounded once to float32).

Box convention: boxes are ``(y0, x0, y1, x1)`` fractions of the image. The map layout decides how they
meet the map (see ``docs/store_format.md``): ``"HW"`` pools map rows ``y0..y1`` and columns ``x0..x1``;
``"WH"`` pools the transposed box exactly as the authors' loader does (their ``(y0, x0, y1, x1)`` box
handed to ``roi_align``, which reads ``(x1, y1, x2, y2)``). Outputs are always geometric: for an
output grid ``(oh, ow)`` the target is ``[C, oh, ow]`` with ``oh`` along the image's height.

This builds the dense ``[B, C, H, W]`` map on purpose; the fused operator must match it without doing so.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import roi_align

from ..config import LAYOUTS


def crop_boxes(anchors, shapes, image_shapes) -> torch.Tensor:
    """Normalised crop boxes ``[B, 4]`` = ``(y0, x0, y1, x1)`` from DALI crop windows.

    Args:
        anchors: ``[B, 2]`` crop anchor ``(y, x)`` in pixels (``random_crop_generator`` order).
        shapes: ``[B, 2]`` crop shape ``(h, w)`` in pixels.
        image_shapes: ``[B, >=2]`` image shape ``(H, W[, C])`` (``peek_image_shape`` order).
    """
    anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.float64).reshape(-1, 2)
    shapes = torch.as_tensor(np.asarray(shapes), dtype=torch.float64).reshape(-1, 2)
    sizes = torch.as_tensor(np.asarray(image_shapes), dtype=torch.float64)[:, :2]
    start = anchors / sizes
    end = (anchors + shapes) / sizes
    return torch.cat([start, end], dim=1).float()


def dense_label_maps(logits: torch.Tensor, class_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatter top-k ``logits [B, k, H, W]`` at ``class_ids`` into zeros ``[B, C, H, W]`` (float32)."""
    b, _, h, w = logits.shape
    dense = torch.zeros(b, num_classes, h, w, dtype=torch.float32, device=logits.device)
    return dense.scatter_(1, class_ids.long(), logits.float())


def reference_label_pooling(logits, class_ids, boxes, num_classes: int, layout: str = "HW",
                            output_size: Sequence[int] = (1, 1), flips=None,
                            temperature: float = 1.0, apply_softmax: bool = True) -> torch.Tensor:
    """Soft targets by the authors' method.

    Args:
        logits: ``[B, k, H, W]`` top-k logits (any float dtype).
        class_ids: ``[B, k, H, W]`` class of each logit.
        boxes: ``[B, 4]`` ``(y0, x0, y1, x1)`` in image fractions (see :func:`crop_boxes`).
        num_classes: C.
        layout: ``"HW"`` or ``"WH"`` (module docstring).
        output_size: ``(oh, ow)`` target grid.
        flips: ``[B]`` flags; a flipped sample's grid is mirrored left-right.
        temperature: divides the pooled logits before the softmax.
        apply_softmax: return pooled logits instead of probabilities when ``False``.

    Returns:
        ``[B, C]`` float32 for a 1x1 grid, else ``[B, C, oh, ow]``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'HW' or 'WH', got {layout!r}")
    logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits)
    class_ids = torch.as_tensor(np.asarray(class_ids) if not torch.is_tensor(class_ids) else class_ids)
    dense = dense_label_maps(logits, class_ids, num_classes)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).to(dense.device)
    b, _, map_h, map_w = dense.shape
    oh, ow = (int(s) for s in output_size)
    y0, x0, y1, x1 = boxes.unbind(1)
    if layout == "HW":
        rois = torch.stack([x0 * map_w, y0 * map_h, x1 * map_w, y1 * map_h], dim=1) - 0.5
        pooled = roi_align(dense, _with_batch_index(rois), output_size=(oh, ow),
                           sampling_ratio=-1, aligned=False)
    else:
        # The authors' call: the (y0, x0, y1, x1) box read by roi_align as (x1, y1, x2, y2).
        rois = torch.stack([y0 * map_w, x0 * map_h, y1 * map_w, x1 * map_h], dim=1) - 0.5
        pooled = roi_align(dense, _with_batch_index(rois), output_size=(ow, oh),
                           sampling_ratio=-1, aligned=False).transpose(-1, -2)
    if flips is not None:
        flips = (flips if torch.is_tensor(flips) else torch.as_tensor(np.asarray(flips)))
        flips = flips.reshape(-1).bool().to(pooled.device)
        pooled = torch.where(flips.view(-1, 1, 1, 1), pooled.flip(-1), pooled)
    if apply_softmax:
        pooled = _softmax(pooled, temperature)
    else:
        pooled = pooled / temperature
    return pooled.reshape(b, num_classes) if (oh, ow) == (1, 1) else pooled.contiguous()


def _softmax(pooled: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over classes (dim 1) of the float32 pooled logits, computed in float64 and rounded
    once to float32: the oracle's own rounding stays far below the tests' tolerance (a float32
    softmax over 1,000 classes is off by up to ~3e-5 relative)."""
    return torch.softmax(pooled.double() / temperature, dim=1).to(pooled.dtype)


def _with_batch_index(rois: torch.Tensor) -> torch.Tensor:
    index = torch.arange(len(rois), dtype=rois.dtype, device=rois.device).view(-1, 1)
    return torch.cat([index, rois], dim=1)


def pooled_from_crops(logits, class_ids, anchors, shapes, image_shapes, num_classes: int,
                      **kwargs) -> torch.Tensor:
    """:func:`reference_label_pooling` for DALI crop windows (anchor, shape, image shape)."""
    return reference_label_pooling(logits, class_ids, crop_boxes(anchors, shapes, image_shapes),
                                   num_classes, **kwargs)


def grid_cell_box(cell: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
    """The ``(y0, x0, y1, x1)`` box that covers exactly one map cell ``(i, j)`` of a ``grid``."""
    (i, j), (h, w) = cell, grid
    return torch.tensor([[i / h, j / w, (i + 1) / h, (j + 1) / w]], dtype=torch.float32)


def region_crops(anchors, shapes, region, flips=None):
    """Pixel windows ``(anchors, shapes)`` of ``region`` boxes given in the output image.

    Args:
        anchors, shapes: ``[B, 2]`` the crop windows ``(y, x)`` / ``(h, w)``.
        region: ``[B, 4]`` ``(y0, x0, y1, x1)`` fractions of the output image (the crop after its
            mirror), e.g. a CutMix box.
        flips: ``[B]`` mirror flags of the crops.
    """
    anchors = np.asarray(anchors, np.float64).reshape(-1, 2)
    shapes = np.asarray(shapes, np.float64).reshape(-1, 2)
    region = np.asarray(region, np.float64).reshape(-1, 4)
    flips = np.zeros(len(region), bool) if flips is None else np.asarray(flips).reshape(-1).astype(bool)
    x0 = np.where(flips, 1 - region[:, 3], region[:, 1])
    x1 = np.where(flips, 1 - region[:, 1], region[:, 3])
    start = anchors + np.stack([region[:, 0], x0], 1) * shapes
    size = np.stack([region[:, 2] - region[:, 0], x1 - x0], 1) * shapes
    return start, size


def reference_region_pooling(logits, class_ids, anchors, shapes, image_shapes, region, num_classes: int,
                             mode: str = "inside", flips=None, temperature: float = 1.0,
                             layout: str = "HW") -> torch.Tensor:
    """Soft targets ``[B, C]`` of a region of each crop (``"inside"``) or of the crop without it
    (``"outside"``: ``(P(crop) - f P(region)) / (1 - f)`` on pooled logits, ``f`` the region's area
    share), by the dense reference. An empty region, or a full one with ``"outside"``, gives the
    whole crop's target."""
    start, size = region_crops(anchors, shapes, region, flips)
    region = np.asarray(region, np.float64).reshape(-1, 4)
    area = (region[:, 2] - region[:, 0]) * (region[:, 3] - region[:, 1])
    common = dict(layout=layout, apply_softmax=False)
    whole = pooled_from_crops(logits, class_ids, anchors, shapes, image_shapes, num_classes, **common)
    safe_size = np.where(size > 0, size, 1.0)
    inside = pooled_from_crops(logits, class_ids, start, safe_size, image_shapes, num_classes, **common)
    fraction = torch.as_tensor(area, dtype=torch.float32).view(-1, 1)
    has_region = torch.as_tensor(area > 0).view(-1, 1)
    if mode == "inside":
        pooled = torch.where(has_region, inside, whole)
    else:
        usable = has_region & torch.as_tensor(area < 1).view(-1, 1)
        rest = (whole - fraction * inside) / torch.clamp(1 - fraction, min=1e-12)
        pooled = torch.where(usable, rest, whole)
    return _softmax(pooled, temperature)
