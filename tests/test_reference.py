"""The reference LabelPooling against hand-computed values and an independent NumPy RoIAlign."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from dali_relabel.ops.reference import (crop_boxes, dense_label_maps, grid_cell_box, pooled_from_crops,
                                    reference_label_pooling)
from helpers import random_maps

F32 = np.float32


# ------------------------------------------------------------------------ independent NumPy oracle
def np_bilinear(plane, y, x):
    """torchvision's roi_align bilinear sample of one [H, W] plane (CPU algorithm)."""
    height, width = plane.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * plane[y_low, x_low] + hy * lx * plane[y_low, x_high]
            + ly * hx * plane[y_high, x_low] + ly * lx * plane[y_high, x_high])


def np_roi_align(feature, box, output_size):
    """RoIAlign of ``feature [C, H, W]`` over ``box = (x1, y1, x2, y2)`` in map units,
    ``aligned=False``, ``sampling_ratio=-1``; returns ``[C, ph, pw]`` (float64)."""
    ph_n, pw_n = output_size
    x1, y1, x2, y2 = (F32(v) for v in box)
    roi_w = max(F32(x2 - x1), F32(1.0))
    roi_h = max(F32(y2 - y1), F32(1.0))
    bin_h = F32(roi_h / F32(ph_n))
    bin_w = F32(roi_w / F32(pw_n))
    grid_h = int(math.ceil(roi_h / F32(ph_n)))
    grid_w = int(math.ceil(roi_w / F32(pw_n)))
    count = max(grid_h * grid_w, 1)
    out = np.zeros((feature.shape[0], ph_n, pw_n), np.float64)
    for ph in range(ph_n):
        for pw in range(pw_n):
            for iy in range(grid_h):
                y = F32(y1 + F32(ph) * bin_h + F32(iy + 0.5) * bin_h / F32(grid_h))
                for ix in range(grid_w):
                    x = F32(x1 + F32(pw) * bin_w + F32(ix + 0.5) * bin_w / F32(grid_w))
                    for c in range(feature.shape[0]):
                        out[c, ph, pw] += np_bilinear(feature[c], float(y), float(x))
    return out / count


def np_dense(logits, class_ids, num_classes):
    """Scatter one sample's top-k ``[k, H, W]`` into a zero ``[C, H, W]`` map (float64)."""
    k, h, w = logits.shape
    dense = np.zeros((num_classes, h, w), np.float64)
    for r in range(k):
        for i in range(h):
            for j in range(w):
                dense[int(class_ids[r, i, j]), i, j] = float(logits[r, i, j])
    return dense


def np_pool(logits, class_ids, box, num_classes, layout, output_size):
    """Pooled logits ``[C, oh, ow]`` of one sample, ``box = (y0, x0, y1, x1)`` image fractions."""
    dense = np_dense(logits, class_ids, num_classes)
    _, h, w = dense.shape
    y0, x0, y1, x1 = (F32(v) for v in box)
    half = F32(0.5)
    if layout == "HW":
        roi = (x0 * F32(w) - half, y0 * F32(h) - half, x1 * F32(w) - half, y1 * F32(h) - half)
        return np_roi_align(dense, roi, output_size)
    # WH: map rows follow the image x, map columns the image y. Pool the transposed map, whose
    # rows are image y (W of them) and columns image x (H of them), geometrically.
    transposed = dense.transpose(0, 2, 1)
    roi = (x0 * F32(h) - half, y0 * F32(w) - half, x1 * F32(h) - half, y1 * F32(w) - half)
    return np_roi_align(transposed, roi, output_size)


def np_softmax(z, axis=0):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def one_hot_map(h, w, cell, cls, value, k=2, other=0):
    """k=2 map whose only non-zero logit is ``value`` for ``cls`` at ``cell``."""
    logits = np.zeros((1, k, h, w), np.float32)
    ids = np.zeros((1, k, h, w), np.int64)
    ids[0, 0] = other
    ids[0, 1] = cls
    i, j = cell
    logits[0, 1, i, j] = value
    return logits, ids


def linear_map(h, w):
    """k=1 map of class 1 whose logit at (r, c) is ``r + 10 c`` (class 0 stays 0)."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return (r + 10.0 * c).astype(np.float32)[None, None], np.ones((1, 1, h, w), np.int64)


def pool_logits(logits, ids, box, num_classes, layout, **kw):
    return reference_label_pooling(torch.as_tensor(logits), torch.as_tensor(ids),
                                   torch.as_tensor(box, dtype=torch.float32).reshape(-1, 4),
                                   num_classes, layout=layout, apply_softmax=False, **kw)


# ------------------------------------------------------------------------ (a) one hot cell
@pytest.mark.parametrize("h,w,cell", [(5, 5, (2, 3)), (4, 7, (1, 5)), (4, 7, (3, 6)), (4, 7, (0, 0)),
                                      (3, 3, (1, 1))])
def test_one_hot_cell_pools_exactly_its_logit(h, w, cell):
    c, value = 6, 2.5
    logits, ids = one_hot_map(h, w, cell, 3, value)
    box = grid_cell_box(cell, (h, w))
    # box edges in grid units are [i, i+1] x [j, j+1]; shifted by -0.5 the single sample point of
    # the 1-cell RoI is the cell centre, so bilinear weights are 1 on the cell itself.
    pooled = pool_logits(logits, ids, box, c, "HW")
    assert pooled.shape == (1, c)
    expected = np.zeros(c)
    expected[3] = value
    np.testing.assert_allclose(pooled[0].numpy(), expected, atol=1e-5)
    probs = reference_label_pooling(logits, ids, box, c, layout="HW")
    p3 = math.exp(value) / (math.exp(value) + c - 1)
    assert probs[0, 3].item() == pytest.approx(p3, rel=1e-5)
    for other in set(range(c)) - {3}:
        assert probs[0, other].item() == pytest.approx(1.0 / (math.exp(value) + c - 1), rel=1e-5)
    np.testing.assert_allclose(pooled[0].numpy(), np_pool(logits[0], ids[0], box[0], c, "HW", (1, 1))[:, 0, 0],
                               atol=1e-5)


def test_one_hot_neighbour_cells_get_nothing():
    logits, ids = one_hot_map(5, 5, (2, 3), 3, 4.0)
    for cell in [(2, 2), (2, 4), (1, 3), (3, 3)]:
        pooled = pool_logits(logits, ids, grid_cell_box(cell, (5, 5)), 6, "HW")
        np.testing.assert_allclose(pooled.numpy(), 0.0, atol=1e-5)


def test_one_hot_square_wh_is_transposed():
    c, value = 6, 3.0
    logits, ids = one_hot_map(5, 5, (1, 3), 3, value)
    # WH pools the transposed box: the cell box (1, 3) reads map cell (3, 1), which is empty ...
    probs = reference_label_pooling(logits, ids, grid_cell_box((1, 3), (5, 5)), c, layout="WH")
    np.testing.assert_allclose(probs.numpy(), np.full((1, c), 1.0 / c), atol=1e-6)
    # ... and the cell box (3, 1) reads map cell (1, 3), the hot one.
    probs = reference_label_pooling(logits, ids, grid_cell_box((3, 1), (5, 5)), c, layout="WH")
    assert probs[0, 3].item() == pytest.approx(math.exp(value) / (math.exp(value) + c - 1), rel=1e-5)


# ------------------------------------------------------------------------ (b) asymmetric maps
# Map 4 x 7, class 1 logit = r + 10 c. Where every sample point lies inside [0, H-1] x [0, W-1],
# bilinear interpolation of a linear function is exact, so the pooled value is the linear function
# at the mean sample point, i.e. at the centre of the shifted box.
ASYM_CASES = [
    # (y0, x0, y1, x1), expected HW, expected WH
    # middle box: HW rows 8/7-.5 .. 24/7-.5 (centre 25/14), cols 1.25 .. 4.75 (centre 3);
    #             WH map rows x*H-.5 = .5 .. 2.5 (centre 1.5), map cols y*W-.5 = 1.5 .. 5.5 (centre 3.5)
    ((2 / 7, 0.25, 6 / 7, 0.75), 25 / 14 + 10 * 3.0, 1.5 + 10 * 3.5),
    # top-left corner, covering map cell (0, 0) in HW: one sample at (0, 0) -> 0.
    # WH: rows -.5 .. 4/7-.5, roi height 1 -> one sample at row 0; cols -.5 .. 1.25, roi width 1.75
    #     -> 2 samples at -0.0625 (clamped to 0) and 0.8125 -> mean col 0.40625.
    ((0.0, 0.0, 0.25, 1 / 7), 0.0, 10 * 0.40625),
    # bottom-right corner, covering map cell (3, 6) in HW: one sample at (3, 6) -> 63.
    # WH: rows 24/7-.5 .. 3.5, height 1 -> one sample at 3.43 -> clamped to row 3; cols 4.75 .. 6.5,
    #     2 samples at 5.1875 and 6.0625 (clamped to 6) -> mean col 5.59375.
    ((0.75, 6 / 7, 1.0, 1.0), 3 + 10 * 6.0, 3 + 10 * 5.59375),
]


@pytest.mark.parametrize("box,expect_hw,expect_wh", ASYM_CASES)
def test_asymmetric_map_hw_and_wh_hand_values(box, expect_hw, expect_wh):
    logits, ids = linear_map(4, 7)
    hw = pool_logits(logits, ids, box, 3, "HW")
    wh = pool_logits(logits, ids, box, 3, "WH")
    assert hw[0, 1].item() == pytest.approx(expect_hw, abs=1e-4)
    assert wh[0, 1].item() == pytest.approx(expect_wh, abs=1e-4)
    assert abs(hw[0, 1].item() - wh[0, 1].item()) > 1.0
    assert hw[0, 0].item() == 0.0 and wh[0, 0].item() == 0.0
    for layout, got in (("HW", hw), ("WH", wh)):
        np.testing.assert_allclose(got[0].numpy(), np_pool(logits[0], ids[0], box, 3, layout, (1, 1))[:, 0, 0],
                                   atol=1e-4)


def authors_targets(logits, ids, coords, num_classes):
    """The ReLabel authors' LabelPooling for square maps, written out independently:
    dense scatter, ``boxes = coords * size(3) - 0.5`` with coords ``(y0, x0, y1, x1)`` handed to
    ``roi_align`` (output 1x1), softmax over classes."""
    b, k, h, w = logits.shape
    dense = torch.zeros(b, num_classes, h, w)
    for n in range(b):
        dense[n] = torch.as_tensor(np_dense(logits[n], ids[n], num_classes), dtype=torch.float32)
    coords = torch.as_tensor(coords, dtype=torch.float32)
    boxes = torch.cat([torch.arange(b).view(b, 1).float(), coords * dense.size(3) - 0.5], 1)
    target = roi_align(dense, boxes, output_size=(1, 1))
    return torch.softmax(target.view(b, num_classes), 1)


def test_wh_equals_authors_formula_on_square_maps():
    c, s = 9, 6
    logits, ids = random_maps(5, 4, s, s, c, seed=11)
    rng = np.random.default_rng(12)
    lo = rng.uniform(0.0, 0.6, size=(5, 2))
    hi = lo + rng.uniform(0.1, 0.4, size=(5, 2))
    coords = np.concatenate([lo, hi.clip(max=1.0)], axis=1).astype(np.float32)
    coords[0] = (0.0, 0.0, 1.0, 1.0)
    coords[1] = (0.1, 0.6, 0.4, 1.0)  # strongly asymmetric: would differ if not transposed
    expected = authors_targets(logits, ids, coords, c)
    wh = reference_label_pooling(logits, ids, coords, c, layout="WH")
    torch.testing.assert_close(wh, expected, atol=1e-6, rtol=1e-5)
    hw = reference_label_pooling(logits, ids, coords, c, layout="HW")
    assert (hw[1] - expected[1]).abs().max() > 1e-3  # the layouts really differ on that box


# ------------------------------------------------------------------------ (c) edge boxes
EDGE_BOXES = [
    (0.0, 0.0, 1.0, 1.0),        # whole image
    (0.0, 0.2, 0.3, 0.7),        # touches top
    (0.7, 0.2, 1.0, 0.7),        # touches bottom
    (0.2, 0.0, 0.7, 0.3),        # touches left
    (0.2, 0.7, 0.7, 1.0),        # touches right
    (0.4, 0.1, 0.4 + 1 / 224, 0.9),  # 1 pixel high at 224 px
    (0.1, 0.4, 0.9, 0.4 + 1 / 224),  # 1 pixel wide
    (0.5, 0.5, 0.5, 0.5),        # degenerate
    (0.999, 0.999, 1.0, 1.0),    # a sliver in the far corner
]


@pytest.mark.parametrize("layout", ["HW", "WH"])
def test_edge_boxes_finite_and_normalised(layout):
    c = 8
    logits, ids = random_maps(len(EDGE_BOXES), 3, 5, 7, c, seed=5)
    boxes = np.array(EDGE_BOXES, np.float32)
    probs = reference_label_pooling(logits, ids, boxes, c, layout=layout)
    assert probs.shape == (len(EDGE_BOXES), c) and probs.dtype == torch.float32
    assert torch.isfinite(probs).all()
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(len(EDGE_BOXES)), atol=1e-5, rtol=0)
    pooled = reference_label_pooling(logits, ids, boxes, c, layout=layout, apply_softmax=False)
    for n, box in enumerate(EDGE_BOXES):
        expected = np_pool(logits[n], ids[n], box, c, layout, (1, 1))[:, 0, 0]
        np.testing.assert_allclose(pooled[n].numpy(), expected, atol=1e-4, err_msg=str(box))


@pytest.mark.parametrize("layout", ["HW", "WH"])
@pytest.mark.parametrize("h,w", [(5, 7), (4, 4)])
def test_whole_image_is_mean_of_cells(layout, h, w):
    # box [0, 1] -> roi [-0.5, n - 0.5]: n samples per axis, exactly at the cell centres
    c = 6
    logits, ids = random_maps(2, 3, h, w, c, seed=h * w)
    pooled = reference_label_pooling(logits, ids, [[0, 0, 1, 1]] * 2, c, layout=layout,
                                     apply_softmax=False)
    for n in range(2):
        expected = np_dense(logits[n], ids[n], c).mean(axis=(1, 2))
        np.testing.assert_allclose(pooled[n].numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------ (d) output grid and flips
@pytest.mark.parametrize("layout", ["HW", "WH"])
def test_output_grid_and_flips(layout):
    c = 5
    logits, ids = random_maps(3, 2, 5, 7, c, seed=21)
    boxes = np.array([[0.1, 0.2, 0.9, 0.7], [0.0, 0.0, 1.0, 1.0], [0.3, 0.05, 0.6, 0.95]], np.float32)
    plain = reference_label_pooling(logits, ids, boxes, c, layout=layout, output_size=(2, 3))
    assert plain.shape == (3, c, 2, 3)
    torch.testing.assert_close(plain.sum(1), torch.ones(3, 2, 3), atol=1e-5, rtol=0)
    flips = [True, False, True]
    flipped = reference_label_pooling(logits, ids, boxes, c, layout=layout, output_size=(2, 3),
                                      flips=flips)
    for n, f in enumerate(flips):
        expected = plain[n].flip(-1) if f else plain[n]
        torch.testing.assert_close(flipped[n], expected)
    assert not torch.allclose(flipped[0], plain[0])  # the flip really moved something
    # geometric output: compare to the oracle bin by bin
    raw = reference_label_pooling(logits, ids, boxes, c, layout=layout, output_size=(2, 3),
                                  apply_softmax=False)
    for n in range(3):
        np.testing.assert_allclose(raw[n].numpy(), np_pool(logits[n], ids[n], boxes[n], c, layout, (2, 3)),
                                   atol=1e-4)


def test_output_grid_is_geometric_on_linear_map():
    # class 1 logit r + 10 c on a 4 x 7 map: along the output's last axis (image x) values must grow
    # by about 10 per map column in HW; in WH the image x runs along map rows (step ~1).
    logits, ids = linear_map(4, 7)
    box = [[0.0, 0.0, 1.0, 1.0]]
    hw = pool_logits(logits, ids, box, 2, "HW", output_size=(2, 2))[0, 1]
    wh = pool_logits(logits, ids, box, 2, "WH", output_size=(2, 2))[0, 1]
    assert (hw[:, 1] - hw[:, 0] > 20).all() and (hw[1, :] - hw[0, :] < 5).all()
    assert (wh[1, :] - wh[0, :] > 20).all() and (wh[:, 1] - wh[:, 0] < 5).all()


@pytest.mark.parametrize("layout", ["HW", "WH"])
def test_flip_on_1x1_grid_changes_nothing(layout):
    c = 5
    logits, ids = random_maps(2, 2, 4, 6, c, seed=8)
    boxes = [[0.1, 0.0, 0.5, 0.4], [0.2, 0.3, 0.9, 1.0]]
    a = reference_label_pooling(logits, ids, boxes, c, layout=layout)
    b = reference_label_pooling(logits, ids, boxes, c, layout=layout, flips=[True, True])
    assert a.shape == (2, c)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------ (e) temperature
@pytest.mark.parametrize("output_size", [(1, 1), (2, 2)])
def test_temperature(output_size):
    c = 7
    logits, ids = random_maps(3, 3, 5, 5, c, seed=31)
    boxes = [[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.6, 0.9], [0.5, 0.5, 0.9, 0.8]]
    pooled = reference_label_pooling(logits, ids, boxes, c, output_size=output_size, apply_softmax=False)
    halved = reference_label_pooling(logits, ids, boxes, c, output_size=output_size, apply_softmax=False,
                                     temperature=2.0)
    torch.testing.assert_close(halved, pooled / 2)
    probs = reference_label_pooling(logits, ids, boxes, c, output_size=output_size, temperature=2.0)
    torch.testing.assert_close(probs, torch.softmax(pooled / 2, dim=1))
    sharp = reference_label_pooling(logits, ids, boxes, c, output_size=output_size)
    # a higher temperature flattens the distribution: the top probability never grows
    assert (probs.amax(1) <= sharp.amax(1) + 1e-7).all()
    assert not torch.allclose(probs, sharp)


# ------------------------------------------------------------------------ (f) crop boxes
def test_crop_boxes_fractions():
    anchors = [[10, 20], [0, 30], [0, 0]]
    shapes = [[50, 100], [40, 60], [375, 500]]
    image_shapes = [[100, 200, 3], [80, 120, 3], [375, 500, 3]]
    boxes = crop_boxes(anchors, shapes, image_shapes)
    assert boxes.shape == (3, 4) and boxes.dtype == torch.float32
    expected = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.0, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(boxes, expected)
    # (H, W) image shapes without channels, numpy input
    two = crop_boxes(np.array([[3, 4]]), np.array([[6, 8]]), np.array([[12, 16]]))
    torch.testing.assert_close(two, torch.tensor([[0.25, 0.25, 0.75, 0.75]]))


def test_pooled_from_crops_matches_reference():
    c = 6
    logits, ids = random_maps(2, 3, 5, 5, c, seed=41)
    anchors, shapes, image_shapes = [[10, 20], [0, 0]], [[50, 100], [30, 40]], [[100, 200, 3], [60, 40, 3]]
    got = pooled_from_crops(logits, ids, anchors, shapes, image_shapes, c, layout="WH", output_size=(1, 1))
    expected = reference_label_pooling(logits, ids, [[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 0.5, 1.0]], c,
                                       layout="WH")
    torch.testing.assert_close(got, expected)


def test_grid_cell_box():
    torch.testing.assert_close(grid_cell_box((1, 2), (4, 5)), torch.tensor([[0.25, 0.4, 0.5, 0.6]]))


def test_dense_label_maps():
    logits, ids = random_maps(2, 3, 3, 4, 6, seed=51)
    dense = dense_label_maps(torch.as_tensor(logits), torch.as_tensor(ids), 6)
    assert dense.shape == (2, 6, 3, 4) and dense.dtype == torch.float32
    for n in range(2):
        np.testing.assert_array_equal(dense[n].numpy(), np_dense(logits[n], ids[n], 6))


def test_bad_layout():
    logits, ids = random_maps(1, 2, 3, 3, 4)
    with pytest.raises(ValueError, match="layout"):
        reference_label_pooling(logits, ids, [[0, 0, 1, 1]], 4, layout="XY")


# ------------------------------------------------------------------------ random cases vs oracle
@pytest.mark.parametrize("layout", ["HW", "WH"])
@pytest.mark.parametrize("output_size", [(1, 1), (2, 3)])
def test_random_cases_match_numpy_oracle(layout, output_size):
    c, b = 10, 4
    logits, ids = random_maps(b, 3, 5, 7, c, seed=61)
    rng = np.random.default_rng(62)
    lo = rng.uniform(0.0, 0.7, size=(b, 2))
    hi = np.minimum(lo + rng.uniform(0.05, 0.6, size=(b, 2)), 1.0)
    boxes = np.concatenate([lo, hi], axis=1).astype(np.float32)
    raw = reference_label_pooling(logits, ids, boxes, c, layout=layout, output_size=output_size,
                                  apply_softmax=False)
    probs = reference_label_pooling(logits, ids, boxes, c, layout=layout, output_size=output_size)
    for n in range(b):
        expected = np_pool(logits[n], ids[n], boxes[n], c, layout, output_size)
        got = raw[n].numpy().reshape(expected.shape)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        np.testing.assert_allclose(probs[n].numpy().reshape(expected.shape), np_softmax(expected),
                                   atol=1e-5)


def test_float16_inputs_match_float32():
    c = 6
    logits, ids = random_maps(2, 3, 4, 4, c, seed=71)
    boxes = [[0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 0.5, 0.5]]
    a = reference_label_pooling(torch.as_tensor(logits), torch.as_tensor(ids).to(torch.uint8), boxes, c)
    b = reference_label_pooling(logits.astype(np.float32), ids, boxes, c)
    torch.testing.assert_close(a, b)
