"""The fused relabel.label_pooling operator against the dense reference (CPU; GPU marked `gpu`)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dali_relabel.reference import pooled_from_crops

pytest.importorskip("nvidia.dali")

TOLERANCE = 1e-5


def _fused(num_classes, max_batch, device, **kwargs):
    from dali_relabel.fused import FusedLabelPooling

    return FusedLabelPooling(num_classes, max_batch, device=device, **kwargs)


def random_batch(rng, batch, k, map_h, map_w, num_classes, edge=False):
    """Random maps (distinct classes per cell), images and crop windows inside them."""
    logits = (rng.normal(size=(batch, k, map_h, map_w)) * 4).astype(np.float16)
    ids = np.stack([rng.permuted(np.tile(np.arange(num_classes), (map_h * map_w, 1)), axis=1)[:, :k].T
                    .reshape(k, map_h, map_w) for _ in range(batch)]).astype(np.uint16)
    images = np.stack([rng.integers(1, 600, size=2) for _ in range(batch)])
    anchors, shapes = [], []
    for h, w in images:
        if edge:  # whole image, an edge strip, or a single pixel at a corner
            choice = rng.integers(0, 4)
            a, s = [(0, 0), (0, 0), (h - 1, w - 1), (0, w - 1)][choice], \
                [(h, w), (h, 1), (1, 1), (h, 1)][choice]
        else:
            s = (rng.integers(1, h + 1), rng.integers(1, w + 1))
            a = (rng.integers(0, h - s[0] + 1), rng.integers(0, w - s[1] + 1))
        anchors.append(a)
        shapes.append(s)
    image_shapes = np.concatenate([images, np.full((batch, 1), 3)], axis=1).astype(np.int64)
    return (logits, ids, np.asarray(anchors, np.int32), np.asarray(shapes, np.int32), image_shapes,
            rng.integers(0, 2, size=batch).astype(np.int32))


def assert_matches_reference(op_out, batch, num_classes, **kwargs):
    logits, ids, anchors, shapes, images, mirror = batch
    expected = pooled_from_crops(logits, ids, anchors, shapes, images, num_classes, flips=mirror, **kwargs)
    assert op_out.shape == expected.shape
    torch.testing.assert_close(op_out, expected, rtol=TOLERANCE, atol=1e-7)


CONFIGS = [
    dict(layout="HW", output_size=(1, 1)),
    dict(layout="WH", output_size=(1, 1)),
    dict(layout="HW", output_size=(2, 3)),
    dict(layout="WH", output_size=(3, 2)),
    dict(layout="HW", output_size=(1, 1), temperature=2.5),
    dict(layout="WH", output_size=(2, 2), apply_softmax=False),
]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=lambda i: "-".join(
    f"{v}" for v in CONFIGS[i].values()))
def cpu_op(request):
    config = CONFIGS[request.param]
    return config, _fused(37, 8, "cpu", **config)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 8), k=st.integers(1, 5),
       map_h=st.integers(1, 16), map_w=st.integers(1, 16), edge=st.booleans())
def test_cpu_backend_matches_reference(cpu_op, seed, batch, k, map_h, map_w, edge):
    config, op = cpu_op
    data = random_batch(np.random.default_rng(seed), batch, k, map_h, map_w, 37, edge=edge)
    assert_matches_reference(op(*data), data, 37, **config)


def test_asymmetric_map_catches_axis_swap():
    # A wide map whose classes change along x only; a crop of the left third must see the left class.
    num_classes, map_h, map_w = 4, 3, 6
    logits = np.full((1, 1, map_h, map_w), 9.0, np.float16)
    ids = np.zeros((1, 1, map_h, map_w), np.uint8)
    ids[..., 3:] = 1
    crop = (np.array([[0, 0]]), np.array([[300, 100]]), np.array([[300, 300, 3]]))  # left third, full height
    out_hw = _fused(num_classes, 1, "cpu", layout="HW")(logits, ids, *crop)
    assert out_hw[0].argmax() == 0 and out_hw[0, 1] < 1e-3
    # Read transposed, the same box spans map rows 0..1 (x) and all 6 columns (y): both classes.
    out_wh = _fused(num_classes, 1, "cpu", layout="WH")(logits, ids, *crop)
    assert out_wh[0, 1] > 0.1 and out_wh[0, 0] > 0.1
    assert_matches_reference(out_wh, (logits, ids, *crop, np.zeros(1, np.int32)), num_classes, layout="WH")


def test_float32_logits_and_int_class_ids_are_accepted():
    rng = np.random.default_rng(3)
    data = list(random_batch(rng, 4, 5, 15, 15, 1000))
    data[0] = data[0].astype(np.float32)
    data[1] = data[1].astype(np.int32)
    assert_matches_reference(_fused(1000, 4, "cpu")(*data), data, 1000)


def test_flip_mirrors_a_token_grid_and_leaves_a_single_target_unchanged():
    rng = np.random.default_rng(4)
    data = list(random_batch(rng, 3, 5, 8, 8, 20))
    grid_op = _fused(20, 3, "cpu", output_size=(2, 4))
    plain = grid_op(*data[:5], np.zeros(3, np.int32))
    flipped = grid_op(*data[:5], np.ones(3, np.int32))
    torch.testing.assert_close(flipped, plain.flip(-1))
    single = _fused(20, 3, "cpu")
    torch.testing.assert_close(single(*data[:5], np.ones(3, np.int32)), single(*data[:5], np.zeros(3, np.int32)))


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d[1].__setitem__((1, 0, 0, 0), 50), "sample 1: class id 50"),
    (lambda d: d[0].__setitem__((2, 1, 0, 3), np.nan), "sample 2: logit at [k=1, y=0, x=3] is not finite"),
])
def test_bad_values_are_reported_with_the_sample(corrupt, message):
    data = list(random_batch(np.random.default_rng(5), 3, 2, 4, 4, 20))
    corrupt(data)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _fused(20, 3, "cpu")(*data)


def test_wrong_shapes_are_reported():
    data = list(random_batch(np.random.default_rng(6), 2, 2, 4, 4, 20))
    data[1] = data[1][:, :, :3]
    with pytest.raises(RuntimeError, match="class_ids shape .* differs from logits shape"):
        _fused(20, 2, "cpu")(*data)
    data = list(random_batch(np.random.default_rng(6), 2, 2, 4, 4, 20))
    data[2] = np.zeros((2, 3), np.int32)
    with pytest.raises(RuntimeError, match="crop_anchor must hold 2 values"):
        _fused(20, 2, "cpu")(*data)


def test_bad_arguments_are_reported():
    with pytest.raises(RuntimeError, match='layout must be "HW" or "WH"'):
        _fused(20, 2, "cpu", layout="XY")


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gpu_backend_matches_reference(config):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    op = _fused(1000, 64, "gpu", **config)
    for seed in range(5):
        data = random_batch(np.random.default_rng(seed), 64, 5, 15, 15, 1000, edge=seed == 4)
        assert_matches_reference(op(*data), data, 1000, **config)


@pytest.mark.gpu
def test_gpu_backend_reports_bad_class_ids():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    data = list(random_batch(np.random.default_rng(5), 3, 2, 4, 4, 20))
    data[1][2, 0, 0, 0] = 99
    with pytest.raises(RuntimeError, match="sample 2: class id 99"):
        _fused(20, 3, "gpu")(*data)


def _random_regions(rng, batch, empty_every=0):
    y = np.sort(rng.uniform(0, 1, size=(batch, 2)), axis=1)
    x = np.sort(rng.uniform(0, 1, size=(batch, 2)), axis=1)
    region = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1).astype(np.float32)
    if empty_every:
        region[::empty_every] = [0.5, 0.5, 0.5, 0.5]
    return region


@pytest.mark.parametrize("mode", ["inside", "outside"])
@pytest.mark.parametrize("layout", ["HW", "WH"])
def test_region_pooling_matches_reference(mode, layout):
    from dali_relabel.reference import reference_region_pooling

    op = _fused(50, 8, "cpu", layout=layout, region_mode=mode)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        data = random_batch(rng, 8, 5, 7, 9, 50)
        region = _random_regions(rng, 8, empty_every=3 if seed == 1 else 0)
        if seed == 2:
            region[0] = [0, 0, 1, 1]  # the whole output image
        expected = reference_region_pooling(*data[:5], region, 50, mode=mode, flips=data[5], layout=layout)
        torch.testing.assert_close(op(*data, region=region), expected, rtol=TOLERANCE, atol=1e-6)


def test_region_follows_the_mirror():
    # A map with class 1 on the left half of the image only. The left half of a mirrored output
    # shows the image's right half, so a region there must not see class 1.
    logits = np.full((2, 1, 4, 4), 9.0, np.float16)
    ids = np.zeros((2, 1, 4, 4), np.uint8)
    ids[..., :2] = 1
    crop = (np.zeros((2, 2), np.int32), np.full((2, 2), 100, np.int32), np.full((2, 3), [100, 100, 3]))
    left_half = np.array([[0, 0, 1, 0.5]] * 2, np.float32)
    out = _fused(2, 2, "cpu", region_mode="inside")(logits, ids, *crop, np.array([0, 1], np.int32), left_half)
    assert out[0, 1] > 0.99 and out[1, 1] < 0.01


def test_bad_region_is_reported():
    data = random_batch(np.random.default_rng(0), 2, 1, 3, 3, 5)
    with pytest.raises(RuntimeError, match=r"sample 1: region .* must satisfy"):
        _fused(5, 2, "cpu", region_mode="inside")(*data, region=np.array([[0, 0, 1, 1], [0.6, 0, 0.2, 1]]))
