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
