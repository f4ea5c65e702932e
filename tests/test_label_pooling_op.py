"""The fused relabel.label_pooling operator against the dense reference (CPU; GPU marked `gpu`)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dali_relabel.ops.reference import pooled_from_crops

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # every test builds and runs DALI pipelines

TOLERANCE = 1e-5


def _fused(num_classes, max_batch, device, **kwargs):
    from dali_relabel.ops.fused import FusedLabelPooling

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
    # Raw pooled logits (no softmax) can cancel to near zero: float32 sums of logits of size |x| carry
    # an absolute rounding error of a few 1e-7 * |x| there, which no relative tolerance covers.
    atol = 1e-7 if kwargs.get("apply_softmax", True) else 1e-6 * max(1.0, float(np.abs(logits).max()))
    torch.testing.assert_close(op_out, expected, rtol=TOLERANCE, atol=atol)


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
@example(seed=186, batch=7, k=5, map_h=1, map_w=12, edge=False)  # raw logits cancelling to ~5e-4
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


def test_the_pipeline_goes_with_its_owner():
    """No reference cycle through the pipeline: it is freed at once, never left as garbage for a
    forked child's collector (tearing a DALI pipeline down in a child hangs or kills it)."""
    import gc
    import weakref

    gc.disable()
    try:
        op = _fused(5, 2, "cpu")
        op(*random_batch(np.random.default_rng(0), 2, 1, 3, 3, 5))
        pipeline = weakref.ref(op.pipeline)
        del op
        assert pipeline() is None
    finally:
        gc.enable()


def test_bad_arguments_are_reported():
    with pytest.raises(RuntimeError, match='layout must be "HW" or "WH"'):
        _fused(20, 2, "cpu", layout="XY")


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gpu_backend_matches_reference(config):
    op = _fused(1000, 64, "gpu", **config)
    for seed in range(5):
        data = random_batch(np.random.default_rng(seed), 64, 5, 15, 15, 1000, edge=seed == 4)
        assert_matches_reference(op(*data), data, 1000, **config)


@pytest.mark.gpu
def test_gpu_backend_reports_bad_class_ids():
    data = list(random_batch(np.random.default_rng(5), 3, 2, 4, 4, 20))
    data[1][2, 0, 0, 0] = 99
    with pytest.raises(RuntimeError, match="sample 2: class id 99"):
        _fused(20, 3, "gpu")(*data)


# The same cases on both backends: the CPU twin runs everywhere, the GPU one where there is a GPU.
# Each case runs one pipeline with batch sizes that change between calls (the GPU backend's staging
# buffers are reused, regrown and double-buffered across them).
BACKEND_CASES = {
    "k1-15x15": dict(k=1, grid=(15, 15)),
    "k5-15x15": dict(k=5, grid=(15, 15)),
    "k10-7x12": dict(k=10, grid=(7, 12)),
    "k3-16x9-WH": dict(k=3, grid=(16, 9), layout="WH"),
    "k5-14x14-grid2x3": dict(k=5, grid=(14, 14), output_size=(2, 3)),
    "k2-5x11-WH-grid3x2": dict(k=2, grid=(5, 11), layout="WH", output_size=(3, 2)),
    "k5-15x15-region-inside": dict(k=5, grid=(15, 15), region_mode="inside"),
    "k4-9x13-WH-region-outside": dict(k=4, grid=(9, 13), layout="WH", region_mode="outside"),
    "k5-15x15-region-outside-T2": dict(k=5, grid=(15, 15), region_mode="outside", temperature=2.0),
    # more output bins than a CUDA grid's y dimension allows (65535): the kernel's grid is 1-D
    "k1-4x4-grid2x40000": dict(k=1, grid=(4, 4), output_size=(2, 40000), num_classes=3),
}
BATCH_SIZES = (16, 3, 16, 1, 9, 16)


def check_backend_case(device, case, device_id=None):
    """Run one case through one pipeline of ``device`` and compare every call with the reference."""
    from dali_relabel.ops.reference import reference_region_pooling

    case = dict(case)
    k, (map_h, map_w) = case.pop("k"), case.pop("grid")
    num_classes = case.pop("num_classes", 1000)
    region_mode = case.pop("region_mode", None)
    extra = {"device_id": device_id} if device_id is not None else {}
    op = _fused(num_classes, max(BATCH_SIZES), device, region_mode=region_mode, **case, **extra)
    for call, batch in enumerate(BATCH_SIZES):
        rng = np.random.default_rng(call)
        data = random_batch(rng, batch, k, map_h, map_w, num_classes, edge=call == 3)
        if region_mode:
            region = _random_regions(rng, batch, empty_every=3)
            expected = reference_region_pooling(*data[:5], region, num_classes, mode=region_mode,
                                                flips=data[5], layout=case.get("layout", "HW"),
                                                temperature=case.get("temperature", 1.0))
            torch.testing.assert_close(op(*data, region=region), expected, rtol=TOLERANCE, atol=1e-6)
        else:
            assert_matches_reference(op(*data), data, num_classes, **case)
    return op


@pytest.mark.parametrize("case", BACKEND_CASES.values(), ids=BACKEND_CASES.keys())
def test_cpu_backend_cases(case):
    check_backend_case("cpu", case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", BACKEND_CASES.values(), ids=BACKEND_CASES.keys())
def test_gpu_backend_cases(case):
    check_backend_case("gpu", case)


@pytest.mark.gpu
def test_gpu_device_comes_from_torch_or_the_argument():
    last = torch.cuda.device_count() - 1
    with torch.cuda.device(last):  # the default: torch's current device
        op = check_backend_case("gpu", BACKEND_CASES["k5-15x15"])
        assert op.device_id == last
    # Explicit, and destroyed while another device is current (multi-GPU: the operator's buffers
    # live on `last`; its destructor must switch there).
    op = check_backend_case("gpu", BACKEND_CASES["k3-16x9-WH"], device_id=last)
    assert op.device_id == last
    with torch.cuda.device(0):
        del op
        import gc

        gc.collect()
    torch.cuda.synchronize()


# The GPU kernel keeps a block's axis weights in shared memory: H + W <= 6127 there. The CPU has no
# such limit, and the GPU says which input and limit it is instead of failing to launch.
WIDE_MAP = dict(k=1, map_h=1, map_w=6200)


def test_cpu_backend_pools_a_map_too_wide_for_the_gpu():
    data = random_batch(np.random.default_rng(0), 2, WIDE_MAP["k"], WIDE_MAP["map_h"], WIDE_MAP["map_w"], 7)
    assert_matches_reference(_fused(7, 2, "cpu")(*data), data, 7)


@pytest.mark.gpu
def test_gpu_backend_names_the_shared_memory_limit():
    data = random_batch(np.random.default_rng(0), 2, WIDE_MAP["k"], WIDE_MAP["map_h"], WIDE_MAP["map_w"], 7)
    with pytest.raises(RuntimeError, match=r"input 'logits'.*H \+ W may be at most 6127"):
        _fused(7, 2, "gpu")(*data)


@pytest.mark.gpu
def test_gpu_backend_names_the_launch_limit():
    data = random_batch(np.random.default_rng(0), 1, 1, 2, 2, 2)
    with pytest.raises(RuntimeError, match=r"batch size 1 x output_size \(65536, 32768\)"):
        _fused(2, 1, "gpu", output_size=(65536, 32768))(*data)


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
    from dali_relabel.ops.reference import reference_region_pooling

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


# ------------------------------------------------------------------------ geometry (argument `affine`)
def random_affines(rng, batch, height, width, identity_every=0):
    """Random ``[B, 2, 3]`` maps from output pixels to the resized crop: rotation, shear, scale and
    translation about the image centre; some pure translations, horizontal flips and identities."""
    affines = []
    centre = np.array([width / 2, height / 2])
    for n in range(batch):
        kind = rng.integers(0, 4)
        angle = rng.uniform(-np.pi / 4, np.pi / 4) if kind != 1 else 0.0
        shear = rng.uniform(-0.4, 0.4, size=2) if kind != 1 else np.zeros(2)
        scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=2)) if kind == 2 else np.ones(2)
        linear = (np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
                  @ np.array([[1, shear[0]], [shear[1], 1]]) @ np.diag(scale))
        if kind == 3:
            linear = linear @ np.diag([-1.0, 1.0])  # a flip done by the geometric op
        shift = rng.uniform(-0.4, 0.4, size=2) * [width, height]
        affines.append(np.concatenate([linear, (centre - linear @ centre + shift)[:, None]], axis=1))
    affines = np.asarray(affines, np.float32)
    if identity_every:
        affines[::identity_every] = np.eye(2, 3)
    return affines


def assert_warp_matches_reference(op_out, data, affines, image_size, num_classes, region=None, **kwargs):
    from dali_relabel.ops.reference import reference_warp_pooling

    logits, ids, anchors, shapes, images, mirror = data
    expected = reference_warp_pooling(logits, ids, anchors, shapes, images, affines, image_size, num_classes,
                                      flips=mirror, region=region, **kwargs)
    assert op_out.shape == expected.shape
    atol = 1e-7 if kwargs.get("apply_softmax", True) else 1e-6 * max(1.0, float(np.abs(logits).max()))
    torch.testing.assert_close(op_out, expected, rtol=TOLERANCE, atol=atol)


WARP_CONFIGS = [
    dict(layout="HW", output_size=(1, 1), image_size=(224, 224)),
    dict(layout="WH", output_size=(1, 1), image_size=(96, 160)),
    dict(layout="HW", output_size=(3, 2), image_size=(160, 96)),
    dict(layout="WH", output_size=(2, 3), image_size=(224, 224)),
    dict(layout="HW", output_size=(1, 1), image_size=(32, 48), temperature=2.5),
    dict(layout="WH", output_size=(2, 2), image_size=(64, 64), apply_softmax=False),
]


def _warp_op(config, device="cpu", num_classes=37, max_batch=8, **extra):
    config = dict(config)
    image_size = config.pop("image_size")
    return config, image_size, _fused(num_classes, max_batch, device, output_image_size=image_size, **config,
                                      **extra)


@pytest.fixture(scope="module", params=range(len(WARP_CONFIGS)), ids=lambda i: "-".join(
    f"{v}" for v in WARP_CONFIGS[i].values()))
def cpu_warp_op(request):
    return _warp_op(WARP_CONFIGS[request.param])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 8), k=st.integers(1, 5),
       map_h=st.integers(1, 16), map_w=st.integers(1, 16), edge=st.booleans())
def test_cpu_warp_matches_reference(cpu_warp_op, seed, batch, k, map_h, map_w, edge):
    config, image_size, op = cpu_warp_op
    rng = np.random.default_rng(seed)
    data = random_batch(rng, batch, k, map_h, map_w, 37, edge=edge)
    affines = random_affines(rng, batch, *image_size, identity_every=5)
    assert_warp_matches_reference(op(*data, affine=affines), data, affines, image_size, 37, **config)


@pytest.mark.parametrize("config", WARP_CONFIGS[:4], ids=lambda c: f"{c['layout']}-{c['output_size']}")
def test_identity_affine_is_todays_pooling_bit_for_bit(config):
    _, _, with_affine = _warp_op(config)
    plain_config = {k: v for k, v in config.items() if k != "image_size"}
    plain = _fused(37, 8, "cpu", **plain_config)
    for seed in range(3):
        data = random_batch(np.random.default_rng(seed), 8, 5, 15, 15, 37, edge=seed == 2)
        expected = plain(*data)
        assert torch.equal(with_affine(*data), expected)  # affine=None: identities
        assert torch.equal(with_affine(*data, affine=np.tile(np.eye(2, 3, dtype=np.float32), (8, 1, 1))), expected)


def test_warp_follows_a_translation():
    # Class 1 on the image's right half only. Shifted left by half the width, the output's left half
    # shows the crop's right half and its right half is fill: the target is class 1 alone.
    logits = np.full((2, 1, 4, 4), 9.0, np.float16)
    ids = np.zeros((2, 1, 4, 4), np.uint8)
    ids[..., 2:] = 1
    crop = (np.zeros((2, 2), np.int32), np.full((2, 2), 100, np.int32), np.full((2, 3), [100, 100, 3]))
    shift = np.array([[[1, 0, 32], [0, 1, 0]], [[1, 0, -32], [0, 1, 0]]], np.float32)  # 64 x 64 output
    op = _fused(2, 2, "cpu", output_image_size=(64, 64))
    out = op(logits, ids, *crop, np.zeros(2, np.int32), affine=shift)
    assert out[0, 1] > 0.99 and out[1, 0] > 0.99
    # and mirrored, the left half of the image (class 0) comes into view instead
    out = op(logits, ids, *crop, np.ones(2, np.int32), affine=shift)
    assert out[0, 0] > 0.99 and out[1, 1] > 0.99


def test_a_cell_of_pure_fill_gets_the_uniform_distribution():
    data = random_batch(np.random.default_rng(1), 2, 3, 5, 5, 10)
    away = np.array([[[1, 0, 1000], [0, 1, 0]]] * 2, np.float32)  # everything lands right of the crop
    out = _fused(10, 2, "cpu", output_image_size=(32, 32))(*data, affine=away)
    torch.testing.assert_close(out, torch.full((2, 10), 0.1))
    # a grid whose right column shows fill only: that column is uniform, the rest is not
    half = np.array([[[1, 0, 16], [0, 1, 0]]] * 2, np.float32)
    grid = _fused(10, 2, "cpu", output_size=(2, 2), output_image_size=(32, 32))(*data, affine=half)
    torch.testing.assert_close(grid[..., 1], torch.full((2, 10, 2), 0.1))
    assert (grid[..., 0] - 0.1).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["inside", "outside"])
@pytest.mark.parametrize("layout", ["HW", "WH"])
def test_warp_region_pooling_matches_reference(mode, layout):
    op = _fused(50, 8, "cpu", layout=layout, region_mode=mode, output_image_size=(128, 96))
    for seed in range(3):
        rng = np.random.default_rng(seed)
        data = random_batch(rng, 8, 5, 7, 9, 50)
        region = _random_regions(rng, 8, empty_every=3 if seed == 1 else 0)
        if seed == 2:
            region[1] = [0, 0, 1, 1]  # the whole output image
        affines = random_affines(rng, 8, 128, 96, identity_every=4)
        assert_warp_matches_reference(op(*data, region=region, affine=affines), data, affines, (128, 96), 50,
                                      region=region, region_mode=mode, layout=layout)


def test_constant_affine_applies_to_every_sample():
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.ops.plugin import load_plugin

    load_plugin()
    rng = np.random.default_rng(2)
    data = random_batch(rng, 3, 2, 6, 6, 11)
    matrix = random_affines(rng, 1, 40, 40)[0]

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def graph():
        inputs = [fn.external_source(source=_constant_source(d), batch=True) for d in data]
        return fn.relabel.label_pooling(*inputs, num_classes=11, affine=matrix.reshape(-1).tolist(),
                                        output_image_size=[40, 40])

    pipe = graph()
    pipe.build()
    out = torch.from_numpy(pipe.run()[0].as_array())
    assert_warp_matches_reference(out, data, np.stack([matrix] * 3), (40, 40), 11)


def _constant_source(batch):
    batch = [np.ascontiguousarray(x) for x in batch]
    return lambda: batch  # no argument: DALI would pass an iteration number to a one-argument one


def _run_raw_affine(affines, image_size=(16, 16), **extra):
    """The operator with per-sample ``affines`` (a list of arrays, any shape and dtype)."""
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.ops.plugin import load_plugin

    load_plugin()
    data = random_batch(np.random.default_rng(0), len(affines), 1, 3, 3, 5)

    @pipeline_def(batch_size=len(affines), num_threads=1, device_id=None)
    def graph():
        inputs = [fn.external_source(source=_constant_source(d), batch=True) for d in data[:5]]
        affine = fn.external_source(source=_constant_source(affines), batch=True)
        return fn.relabel.label_pooling(*inputs, num_classes=5, affine=affine, **extra,
                                        **({"output_image_size": list(image_size)} if image_size else {}))

    pipe = graph()
    pipe.build()
    return pipe.run()


@pytest.mark.parametrize("affines, message", [
    ([np.eye(2, 3, dtype=np.float32), np.eye(2, dtype=np.float32)],
     r"sample 1: affine must be a \[2, 3\] matrix, got shape 2 x 2"),
    ([np.eye(2, 3, dtype=np.float64)] * 2, "affine must be float32, got double"),
    ([np.eye(2, 3, dtype=np.float32), np.eye(2, 3, dtype=np.float32), np.array([[1, 0, np.nan], [0, 1, 0]], np.float32)],
     r"sample 2: affine\[0\]\[2\] is not finite \(nan\)"),
    ([np.array([[1, 0, 0], [np.inf, 1, 0]], np.float32)], r"sample 0: affine\[1\]\[0\] is not finite"),
])
def test_bad_affine_is_reported_with_the_sample(affines, message):
    with pytest.raises(RuntimeError, match=message):
        _run_raw_affine(affines)


def test_affine_needs_the_output_image_size():
    with pytest.raises(RuntimeError, match=r"affine needs output_image_size \(h, w\)"):
        _run_raw_affine([np.eye(2, 3, dtype=np.float32)], image_size=None)


def test_fused_wrapper_checks_the_affine():
    from dali_relabel.ops.fused import FusedArgumentError

    data = random_batch(np.random.default_rng(0), 2, 1, 3, 3, 5)
    with pytest.raises(FusedArgumentError, match="output_image_size"):
        _fused(5, 2, "cpu")(*data, affine=np.tile(np.eye(2, 3), (2, 1, 1)))
    with pytest.raises(FusedArgumentError, match=r"affine must be \[B, 2, 3\] = \[2, 2, 3\], got shape \[2, 6\]"):
        _fused(5, 2, "cpu", output_image_size=(8, 8))(*data, affine=np.zeros((2, 6)))


@pytest.mark.gpu
@pytest.mark.parametrize("config", WARP_CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gpu_warp_matches_reference(config):
    config, image_size, op = _warp_op(config, "gpu", num_classes=1000, max_batch=64)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        data = random_batch(rng, 64 - 7 * seed, 5, 15, 15, 1000, edge=seed == 3)
        affines = random_affines(rng, len(data[0]), *image_size, identity_every=5)
        assert_warp_matches_reference(op(*data, affine=affines), data, affines, image_size, 1000, **config)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["inside", "outside"])
def test_gpu_warp_region_and_identity(mode):
    op = _fused(1000, 16, "gpu", layout="WH", region_mode=mode, output_image_size=(224, 224))
    plain = _fused(1000, 16, "gpu", layout="WH", region_mode=mode)
    rng = np.random.default_rng(7)
    data = random_batch(rng, 16, 5, 15, 15, 1000)
    region = _random_regions(rng, 16, empty_every=5)
    affines = random_affines(rng, 16, 224, 224, identity_every=3)
    out = op(*data, region=region, affine=affines)
    assert_warp_matches_reference(out, data, affines, (224, 224), 1000, region=region, region_mode=mode,
                                  layout="WH")
    identity = np.all(affines == np.eye(2, 3, dtype=np.float32), axis=(1, 2))
    # the same RoIAlign path; float atomics may add in another order, so not bit for bit
    torch.testing.assert_close(out[identity], plain(*data, region=region)[identity], rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
def test_gpu_warp_names_the_shared_memory_limit():
    data = random_batch(np.random.default_rng(0), 1, 1, 120, 120, 7)
    with pytest.raises(RuntimeError, match=r"argument 'affine'.*H \* W may be at most 12255"):
        _fused(7, 1, "gpu", output_image_size=(8, 8))(*data, affine=random_affines(np.random.default_rng(0), 1, 8, 8))


# ------------------------------------------------ chains of geometric ops (argument `canvas_checks`)
def _slot(rng, height, width):
    """One random slot's output -> input matrix (3 x 3, float64): a big rotation about the centre, a
    shear, a big translation, or (sometimes) the identity, as a photometric slot."""
    kind = rng.integers(0, 4)
    matrix = np.eye(3)
    if kind == 0:
        angle = rng.uniform(-np.pi / 2, np.pi / 2)
        c, s = np.cos(angle), np.sin(angle)
        centre = np.array([width / 2, height / 2])
        linear = np.array([[c, -s], [s, c]])
        matrix[:2, :2], matrix[:2, 2] = linear, centre - linear @ centre
    elif kind == 1:
        matrix[0, 1], matrix[1, 0] = rng.uniform(-0.5, 0.5, size=2)
    elif kind == 2:
        matrix[:2, 2] = rng.uniform(-0.6, 0.6, size=2) * [width, height]
    return matrix


def random_chains(rng, batch, height, width, identity_every=0):
    """Per sample a chain of 2 or 3 slots: ``(affines [B, 2, 3], checks)``, the composed affine
    ``M_1 @ ... @ M_n`` and the list of ``[n - 1, 2, 3]`` partial products ``M_k @ ... @ M_n``
    (``k = 2 .. n``), all float32; some samples with no checks at all (``[0, 2, 3]``)."""
    affines, checks = [], []
    for n in range(batch):
        slots = [_slot(rng, height, width) for _ in range(rng.integers(2, 4))]
        suffix = [np.linalg.multi_dot(slots[k:]) if len(slots) - k > 1 else slots[k] for k in range(len(slots))]
        affines.append(suffix[0][:2])
        partial = np.asarray([s[:2] for s in suffix[1:]], np.float32)
        checks.append(partial if n % 4 != 3 else np.zeros((0, 2, 3), np.float32))
    affines = np.asarray(affines, np.float32)
    if identity_every:
        affines[::identity_every] = np.eye(2, 3)
    return affines, checks


@pytest.fixture(scope="module", params=range(len(WARP_CONFIGS)), ids=lambda i: "-".join(
    f"{v}" for v in WARP_CONFIGS[i].values()))
def cpu_chain_op(request):
    return _warp_op(WARP_CONFIGS[request.param], canvas_checks=True)


def test_cpu_chain_matches_reference(cpu_chain_op):
    from dali_relabel.ops.reference import reference_warp_pooling

    config, image_size, op = cpu_chain_op
    changed = 0
    for seed in range(6):
        rng = np.random.default_rng([seed, 20])
        data = random_batch(rng, 8, int(rng.integers(1, 6)), *rng.integers(1, 17, size=2), 37, edge=seed == 5)
        affines, checks = random_chains(rng, 8, *image_size, identity_every=5 if seed % 2 else 0)
        out = op(*data, affine=affines, canvas_checks=checks)
        assert_warp_matches_reference(out, data, affines, image_size, 37, canvas_checks=checks, **config)
        composed_only = reference_warp_pooling(*data[:5], affines, image_size, 37, flips=data[5], **config)
        changed += int(((out - composed_only).abs().flatten(1).max(1).values > 1e-3).sum())
    assert changed > 0, "some chains pushed content off the canvas that the composed affine maps inside"


def _halves_map(batch):
    """Label maps of ``batch`` whole-image crops: class 0 on the image's left half, class 1 on its
    right half (confident logits), for a 32 x 32 output image."""
    logits = np.full((batch, 1, 4, 4), 9.0, np.float16)
    ids = np.zeros((batch, 1, 4, 4), np.uint8)
    ids[..., 2:] = 1
    crop = (np.zeros((batch, 2), np.int32), np.full((batch, 2), 64, np.int32), np.full((batch, 3), [64, 64, 3]))
    return logits, ids, crop


def test_content_pushed_off_the_canvas_is_fill_not_content():
    # Slot 1 shifts the content left by half the width (its right half shows fill), slot 2 shifts it
    # back right by half (sample 0; the composed affine is the identity) or by a quarter (sample 1).
    # Only the crop's right half survives both: the target is class 1 alone. The composed affine
    # alone maps the whole output (sample 0) or three quarters of it (sample 1) inside the crop and
    # would count the left half's class 0 as well.
    logits, ids, crop = _halves_map(2)
    first = np.array([[1, 0, 16], [0, 1, 0], [0, 0, 1]], np.float64)
    seconds = [np.array([[1, 0, -16], [0, 1, 0], [0, 0, 1]], np.float64),
               np.array([[1, 0, -8], [0, 1, 0], [0, 0, 1]], np.float64)]
    affines = np.asarray([(first @ second)[:2] for second in seconds], np.float32)
    checks = np.asarray([second[:2][None] for second in seconds], np.float32)  # [B, 1, 2, 3]
    np.testing.assert_array_equal(affines[0], np.eye(2, 3))
    op = _fused(2, 2, "cpu", output_image_size=(32, 32), canvas_checks=True)
    mirror = np.zeros(2, np.int32)
    out = op(logits, ids, *crop, mirror, affine=affines, canvas_checks=checks)
    assert (out[:, 0] < 1e-3).all(), out
    composed_only = op(logits, ids, *crop, mirror, affine=affines)
    assert (composed_only[:, 0] > 0.04).all(), composed_only  # what the affine alone pools: class 0 too
    assert_warp_matches_reference(out, (logits, ids, *crop, mirror), affines, (32, 32), 2, canvas_checks=checks)
    # on a token grid: the left column shows fill only (uniform), the right one class 1
    grid = _fused(2, 2, "cpu", output_size=(1, 2), output_image_size=(32, 32), canvas_checks=True)
    cells = grid(logits, ids, *crop, mirror, affine=affines, canvas_checks=checks)
    torch.testing.assert_close(cells[0, :, 0, 0], torch.full((2,), 0.5))
    assert cells[0, 1, 0, 1] > 0.99


def test_identity_checks_change_nothing_bit_for_bit():
    # An identity chain pools as today's RoIAlign; a chain with one geometric op (every check the
    # identity) as the affine alone: bit for bit.
    config = dict(layout="WH", output_size=(2, 3))
    plain = _fused(37, 8, "cpu", **config)
    op = _fused(37, 8, "cpu", output_image_size=(64, 64), canvas_checks=True, **config)
    rng = np.random.default_rng(4)
    identities = np.tile(np.eye(2, 3, dtype=np.float32), (8, 2, 1, 1))
    for seed in range(3):
        data = random_batch(np.random.default_rng(seed), 8, 5, 15, 15, 37, edge=seed == 2)
        assert torch.equal(op(*data, canvas_checks=identities), plain(*data))
        affines = random_affines(rng, 8, 64, 64)
        assert torch.equal(op(*data, affine=affines, canvas_checks=identities), op(*data, affine=affines))


def test_constant_canvas_checks_apply_to_every_sample():
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.ops.plugin import load_plugin

    load_plugin()
    rng = np.random.default_rng(3)
    data = random_batch(rng, 3, 2, 6, 6, 11)
    affines, checks = random_chains(rng, 1, 40, 40)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def graph():
        inputs = [fn.external_source(source=_constant_source(d), batch=True) for d in data]
        return fn.relabel.label_pooling(*inputs, num_classes=11, affine=affines[0].reshape(-1).tolist(),
                                        canvas_checks=checks[0].reshape(-1).tolist(), output_image_size=[40, 40])

    pipe = graph()
    pipe.build()
    out = torch.from_numpy(pipe.run()[0].as_array())
    assert_warp_matches_reference(out, data, np.repeat(affines, 3, 0), (40, 40), 11, canvas_checks=checks * 3)


def _run_raw_checks(checks, image_size=(16, 16)):
    """The operator with per-sample ``canvas_checks`` (a list of arrays, any shape and dtype)."""
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.ops.plugin import load_plugin

    load_plugin()
    data = random_batch(np.random.default_rng(0), len(checks), 1, 3, 3, 5)

    @pipeline_def(batch_size=len(checks), num_threads=1, device_id=None)
    def graph():
        inputs = [fn.external_source(source=_constant_source(d), batch=True) for d in data[:5]]
        given = fn.external_source(source=_constant_source(checks), batch=True)
        return fn.relabel.label_pooling(*inputs, num_classes=5, canvas_checks=given,
                                        **({"output_image_size": list(image_size)} if image_size else {}))

    pipe = graph()
    pipe.build()
    return pipe.run()


@pytest.mark.parametrize("checks, message", [
    ([np.zeros((0, 2, 3), np.float32), np.zeros((1, 3, 2), np.float32)],
     r"sample 1: canvas_checks must be \[m, 2, 3\] matrices, got shape 1 x 3 x 2"),
    ([np.zeros((1, 2, 3), np.float64)], "canvas_checks must be float32, got double"),
    ([np.zeros((1, 2, 3), np.float32), np.stack([np.eye(2, 3), [[1, 0, 0], [0, 1, np.inf]]]).astype(np.float32)],
     r"sample 1: canvas_checks\[1\]\[1\]\[2\] is not finite \(inf\)"),
])
def test_bad_canvas_checks_are_reported_with_the_sample(checks, message):
    with pytest.raises(RuntimeError, match=message):
        _run_raw_checks(checks)


def test_canvas_checks_need_the_output_image_size():
    with pytest.raises(RuntimeError, match=r"canvas_checks need output_image_size \(h, w\)"):
        _run_raw_checks([np.eye(2, 3, dtype=np.float32)[None]], image_size=None)


def test_fused_wrapper_checks_the_canvas_checks():
    from dali_relabel.ops.fused import FusedArgumentError

    data = random_batch(np.random.default_rng(0), 2, 1, 3, 3, 5)
    with pytest.raises(FusedArgumentError, match="canvas_checks needs output_image_size"):
        _fused(5, 2, "cpu", canvas_checks=True)
    with pytest.raises(FusedArgumentError, match="built with canvas_checks=True"):
        _fused(5, 2, "cpu", output_image_size=(8, 8))(*data, canvas_checks=np.zeros((2, 0, 2, 3)))
    op = _fused(5, 2, "cpu", output_image_size=(8, 8), canvas_checks=True)
    with pytest.raises(FusedArgumentError, match=r"canvas_checks of sample 1 must be \[m, 2, 3\], got shape \[2, 3\]"):
        op(*data, canvas_checks=[np.zeros((0, 2, 3)), np.eye(2, 3)])
    with pytest.raises(FusedArgumentError, match=r"one \[m, 2, 3\] array per sample \(2\), got 1"):
        op(*data, canvas_checks=[np.zeros((0, 2, 3))])


@pytest.mark.gpu
@pytest.mark.parametrize("config", WARP_CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gpu_chain_matches_reference(config):
    config, image_size, op = _warp_op(config, "gpu", num_classes=1000, max_batch=64, canvas_checks=True)
    for seed in range(4):
        rng = np.random.default_rng([seed, 21])
        data = random_batch(rng, 64 - 7 * seed, 5, 15, 15, 1000, edge=seed == 3)
        affines, checks = random_chains(rng, len(data[0]), *image_size, identity_every=5)
        out = op(*data, affine=affines, canvas_checks=checks)
        assert_warp_matches_reference(out, data, affines, image_size, 1000, canvas_checks=checks, **config)


@pytest.mark.gpu
def test_gpu_content_pushed_off_the_canvas_is_fill():
    logits, ids, crop = _halves_map(2)
    affines = np.tile(np.eye(2, 3, dtype=np.float32), (2, 1, 1))
    checks = [np.array([[[1, 0, -16], [0, 1, 0]]], np.float32), np.zeros((0, 2, 3), np.float32)]
    op = _fused(2, 2, "gpu", output_image_size=(32, 32), canvas_checks=True)
    out = op(logits, ids, *crop, np.zeros(2, np.int32), affine=affines, canvas_checks=checks)
    assert out[0, 1] > 0.99 and abs(float(out[1, 1]) - 0.5) < 0.05
