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

Geometry (:func:`reference_warp_pooling`): after the crop, resize and flip, geometric ops may move the
pixels; an ``affine [2, 3]`` per sample maps an output pixel position to its position in the resized,
flipped crop. The target is then the dense map sampled at the inverse-mapped positions of a lattice of
output points (the operator's lattice), the points that show fill left out, averaged and softmaxed.
With a chain of geometric ops, ``canvas_checks`` (the partial compositions, output pixel -> each
intermediate canvas) leave out the points an earlier op pushed off the canvas as well.

This builds the dense ``[B, C, H, W]`` map on purpose; the fused operator must match it without doing so.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import math

import numpy as np
import torch
import torch.nn.functional as F
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


# Sample points per output cell and axis on the warp path, at most (the operator's kMaxLattice).
MAX_LATTICE = 64
IDENTITY_AFFINE = np.eye(2, 3, dtype=np.float32)


def warp_lattice_counts(span: float, jacobian_column, kx: float, ky: float, bins: int) -> int:
    """Points per output cell along one output axis: ``ceil(length on the map grid / bins)`` (as
    RoIAlign's sampling ratio), between 1 and :data:`MAX_LATTICE`.

    Args:
        span: the sampled rectangle's size along this axis, in output pixels.
        jacobian_column: the affine's column for this axis, ``(d qx, d qy)`` per output pixel.
        kx, ky: map grid cells per resized-crop pixel along the image's x and y.
        bins: output cells along this axis.
    """
    gx, gy = kx * float(jacobian_column[0]), ky * float(jacobian_column[1])
    n = math.ceil(span * math.sqrt(gx * gx + gy * gy) / bins - 1e-6)
    return int(min(max(n, 1), MAX_LATTICE))


def _on_canvas(matrix, x: np.ndarray, y: np.ndarray, width: float, height: float) -> np.ndarray:
    """Where the float32 ``[2, 3]`` ``matrix`` maps the float32 points ``(x, y)`` (given as float64)
    into ``[0, width] x [0, height]``: the operator's exact-product double arithmetic."""
    m = [float(v) for v in np.asarray(matrix, np.float32).reshape(6)]
    px = (m[0] * x + m[1] * y) + m[2]
    py = (m[3] * x + m[4] * y) + m[5]
    return (px >= 0) & (px <= width) & (py >= 0) & (py <= height)


def _non_identity(checks) -> list:
    """The ``[2, 3]`` canvas checks of one sample (``[m, 2, 3]``, float32 values) that are not the
    identity (an identity check holds for every output point; the operator skips it too)."""
    if checks is None:
        return []
    checks = np.asarray(checks, np.float32).reshape(-1, 2, 3)
    return [c for c in checks if not np.array_equal(c, IDENTITY_AFFINE)]


def _warp_pool_sample(dense: torch.Tensor, affine: np.ndarray, anchor, shape, image_shape, flip: bool,
                      output_image_size, output_size, layout: str, region=None, region_mode: str = "inside",
                      checks=()):
    """Pooled logits ``[C, oh, ow]`` (float64) of one sample on the warp path (``checks``: its
    non-identity canvas checks)."""
    _, map_h, map_w = dense.shape
    height, width = (float(v) for v in output_image_size)
    oh, ow = output_size
    cy, cx = (float(v) for v in anchor)
    ch, cw = (float(v) for v in shape)
    image_h, image_w = (float(v) for v in image_shape[:2])
    m = [float(v) for v in np.asarray(affine, np.float32).reshape(6)]
    cells_x, cells_y = (float(map_w), float(map_h)) if layout == "HW" else (float(map_h), float(map_w))
    kx = cw * cells_x / (width * image_w)
    bx = cx * cells_x / image_w - 0.5
    ky = ch * cells_y / (height * image_h)
    by = cy * cells_y / image_h - 0.5
    x0, y0, span_x, span_y = 0.0, 0.0, width, height
    exclude = None
    if region is not None:
        r = [float(v) for v in region]
        area = (r[2] - r[0]) * (r[3] - r[1])
        if area > 0 and region_mode == "inside":
            x0, y0, span_x, span_y = r[1] * width, r[0] * height, (r[3] - r[1]) * width, (r[2] - r[0]) * height
        elif area > 0 and area < 1:
            exclude = [np.float32(r[1] * width), np.float32(r[3] * width), np.float32(r[0] * height),
                       np.float32(r[2] * height)]
    nx = warp_lattice_counts(span_x, (m[0], m[3]), kx, ky, ow)
    ny = warp_lattice_counts(span_y, (m[1], m[4]), kx, ky, oh)
    step_x = np.float32(span_x / (float(ow) * nx))
    step_y = np.float32(span_y / (float(oh) * ny))
    # The lattice in output pixels, rounded to float32 exactly as the operator rounds it; the affine
    # applied in float64 (exact products), so both decide "shows fill" identically.
    xs = (np.float64(np.float32(x0)) + (np.arange(ow * nx) + 0.5) * np.float64(step_x)).astype(np.float32)
    ys = (np.float64(np.float32(y0)) + (np.arange(oh * ny) + 0.5) * np.float64(step_y)).astype(np.float32)
    y, x = np.meshgrid(ys, xs, indexing="ij")  # [oh * ny, ow * nx]
    shown = np.ones(x.shape, bool)
    if exclude is not None:
        shown &= ~((x >= exclude[0]) & (x <= exclude[1]) & (y >= exclude[2]) & (y <= exclude[3]))
    x, y = x.astype(np.float64), y.astype(np.float64)
    qx = (m[0] * x + m[1] * y) + m[2]
    qy = (m[3] * x + m[4] * y) + m[5]
    shown &= (qx >= 0) & (qx <= width) & (qy >= 0) & (qy <= height)
    for check in checks:  # content an earlier op of a chain pushed off the canvas shows fill
        shown &= _on_canvas(check, x, y, width, height)
    gx = (width - qx if flip else qx) * kx + bx  # map grid coordinate along the image's x
    gy = qy * ky + by
    rows, cols = (gy, gx) if layout == "HW" else (gx, gy)
    # grid_sample (align_corners=False, border) reads pixel coordinate ((g + 1) size - 1) / 2 and
    # clamps it to [0, size - 1]: torchvision's RoIAlign bilinear rule inside the map.
    grid = torch.from_numpy(np.stack([(cols + 0.5) / map_w * 2 - 1, (rows + 0.5) / map_h * 2 - 1], -1))
    values = F.grid_sample(dense.double()[None], grid[None], mode="bilinear", padding_mode="border",
                           align_corners=False)[0]  # [C, oh * ny, ow * nx]
    mask = torch.from_numpy(shown).double()
    values = (values * mask).reshape(-1, oh, ny, ow, nx).sum((2, 4))
    count = mask.reshape(oh, ny, ow, nx).sum((1, 3))
    return torch.where(count > 0, values / count.clamp(min=1), torch.zeros_like(values))


def reference_warp_pooling(logits, class_ids, anchors, shapes, image_shapes, affines, output_image_size,
                           num_classes: int, layout: str = "HW", output_size: Sequence[int] = (1, 1),
                           flips=None, temperature: float = 1.0, apply_softmax: bool = True, region=None,
                           region_mode: str = "inside", canvas_checks=None) -> torch.Tensor:
    """Soft targets of crops seen through geometric transforms, from the dense map.

    The pipeline is crop window (source pixels) -> resize to ``output_image_size`` -> flip ->
    geometric ops (``affines``) -> erase. Per sample, ``affine`` maps an output image position
    ``(x, y)`` (pixel ``i`` covering ``[i, i + 1)``) to ``affine @ (x, y, 1)`` in the resized, flipped
    crop. A sample whose affine is exactly the identity gets :func:`pooled_from_crops` (RoIAlign;
    :func:`reference_region_pooling` with a region). Any other: each output cell is sampled at an
    ``nx x ny`` lattice (the centres of an ``nx x ny`` subdivision of the cell;
    :func:`warp_lattice_counts`), each point mapped by the affine into the crop, unflipped, scaled
    into the crop window and onto the map grid (the layout's convention, shifted by -0.5 as RoIAlign's
    box), and read from the dense map bilinearly (RoIAlign's rule). Points outside the crop window
    (fill) are left out, and so are the points any of the sample's ``canvas_checks`` maps outside
    ``[0, w] x [0, h]`` (content an earlier geometric op of a chain pushed off the canvas); the rest
    are averaged; a cell with none gets logits 0 (uniform). Softmax over classes (float64, rounded
    once to float32). A sample with a non-identity check takes the warp path even at an identity
    affine.

    Args:
        logits, class_ids: ``[B, k, H, W]`` top-k maps.
        anchors, shapes, image_shapes: the crop windows, as for :func:`pooled_from_crops`.
        affines: ``[B, 2, 3]`` (float32 values).
        output_image_size: ``(h, w)`` of the output image in pixels.
        num_classes, layout, output_size, flips, temperature, apply_softmax: as for
            :func:`reference_label_pooling`.
        region: ``[B, 4]`` ``(y0, x0, y1, x1)`` fractions of the output image (1x1 output only):
            ``region_mode="inside"`` samples the region's rectangle, ``"outside"`` leaves its points
            out (an empty region, or a full one with ``"outside"``, changes nothing).
        canvas_checks: per sample ``[m, 2, 3]`` (float32 values; ``[B, m, 2, 3]`` or a list of ``B``
            arrays, ``m`` may differ and be 0): maps from an output position to each intermediate
            canvas of a chain of geometric ops (the operator's argument of that name). ``None``: none.

    Returns:
        ``[B, C]`` float32 for a 1x1 grid, else ``[B, C, oh, ow]``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'HW' or 'WH', got {layout!r}")
    oh, ow = (int(v) for v in output_size)
    if region is not None and ((oh, ow) != (1, 1) or not apply_softmax):
        raise ValueError("a region needs output_size (1, 1) and apply_softmax")
    logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits)
    class_ids = torch.as_tensor(np.asarray(class_ids) if not torch.is_tensor(class_ids) else class_ids)
    b = len(logits)
    anchors = np.asarray(anchors, np.float64).reshape(b, 2)
    shapes = np.asarray(shapes, np.float64).reshape(b, 2)
    image_shapes = np.asarray(image_shapes, np.float64).reshape(b, -1)
    affines = np.asarray(affines, np.float32).reshape(b, 2, 3)
    flips = np.zeros(b, bool) if flips is None else np.asarray(flips).reshape(-1).astype(bool)
    if region is None:
        pooled = pooled_from_crops(logits, class_ids, anchors, shapes, image_shapes, num_classes, layout=layout,
                                   output_size=(oh, ow), flips=flips, temperature=temperature,
                                   apply_softmax=apply_softmax)
    else:
        region = np.asarray(region, np.float32).reshape(b, 4)
        pooled = reference_region_pooling(logits, class_ids, anchors, shapes, image_shapes, region, num_classes,
                                          mode=region_mode, flips=flips, temperature=temperature, layout=layout)
    pooled = pooled.reshape(b, num_classes, oh, ow).clone()
    dense = dense_label_maps(logits, class_ids, num_classes).cpu()
    if canvas_checks is not None and len(canvas_checks) != b:
        raise ValueError(f"canvas_checks must hold one [m, 2, 3] array per sample ({b}), got {len(canvas_checks)}")
    checks = [_non_identity(None if canvas_checks is None else canvas_checks[n]) for n in range(b)]
    for n in np.flatnonzero([not np.array_equal(a, IDENTITY_AFFINE) or len(c) > 0 for a, c in zip(affines, checks)]):
        raw = _warp_pool_sample(dense[n], affines[n], anchors[n], shapes[n], image_shapes[n], flips[n],
                                output_image_size, (oh, ow), layout, None if region is None else region[n],
                                region_mode, checks[n])
        pooled[n] = (_softmax(raw[None], temperature)[0] if apply_softmax else raw / temperature).float()
    return pooled.reshape(b, num_classes) if (oh, ow) == (1, 1) else pooled
