"""Keyed augmentation draws: a sample's policy and erasing follow from (seed, epoch, row) alone.

The same rows give the same draws and pixels whatever their batch, batch position, batch size and
number of DALI threads; another epoch gives other draws; and the graph's draws equal what the Python
twin ``crops.keyed_uniforms`` predicts (op choice, weighted choice without replacement, applied,
level noise, sign, erasing decision).
"""
import numpy as np
import pytest

from augment_helpers import fixed_image, run_rows_pipeline
from dali_relabel.augment import Erasing, apply_policy, parse_policy, random_erase
from dali_relabel.augment.randomness import (ERASING_STREAM_BASE, POLICY_STREAM_BASE, DaliRandom, KeyedRandom,
                                             RandomnessError, resolve)
from dali_relabel.crops import keyed_uniforms
from dali_relabel.errors import DaliRelabelError

SEED = 9
ROWS = np.random.default_rng(0).choice(1_000_000, 24, replace=False)
IMAGES = [fixed_image(32, 40, seed=i) for i in range(len(ROWS))]
ERASING = Erasing.timm(0.8, mode="rand", max_count=3)
DRAW_KEYS = ("op", "applied", "level", "negate", "arg", "sub")


def _graph(policy, erasing, sources):
    """Policy, normalisation and erasing with keyed sources; ``sources`` receives the two rngs."""
    from nvidia.dali import fn, types

    def graph(x, rows, epochs):
        policy_rng = KeyedRandom(rows, epochs, seed=SEED, stream_base=POLICY_STREAM_BASE)
        erasing_rng = KeyedRandom(rows, epochs, SEED, ERASING_STREAM_BASE)
        sources[:] = [policy_rng, erasing_rng]
        images, affine, info = apply_policy(x, policy, rng=policy_rng, debug=True)
        chw = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                       mean=[128.0] * 3, std=[64.0] * 3)
        erased, erased_info = random_erase(chw, erasing, rng=erasing_rng, debug=True)
        draws = tuple(info[k] for k in DRAW_KEYS if k in info)
        return (images, affine, erased, erased_info["erase"], erased_info["count"],
                erased_info["boxes"]) + draws
    return graph


def _by_row(outs, rows):
    """{row: [each output's array]} from run_rows_pipeline's per-output lists."""
    return {int(row): [out[i] for out in outs] for i, row in enumerate(rows)}


@pytest.mark.slow
@pytest.mark.parametrize("text", ["rand-m9-n3-mstd0.5-tweights-p0.7", "3a", "ta_wide", "imagenet"])
def test_draws_and_pixels_follow_the_row_not_the_batch(text):
    policy = parse_policy(text)
    sources = []
    base = _by_row(run_rows_pipeline(_graph(policy, ERASING, sources), IMAGES, ROWS, 4, batch_size=8), ROWS)
    # the policy and the erasing take disjoint keyed streams, none of the crop's (0-3)
    policy_streams = {s for s, _ in sources[0].streams}
    erasing_streams = {s for s, _ in sources[1].streams}
    assert min(policy_streams) == POLICY_STREAM_BASE and max(policy_streams) < ERASING_STREAM_BASE
    assert min(erasing_streams) == ERASING_STREAM_BASE and not policy_streams & erasing_streams
    # another order, batch size and thread count: the same arrays per row
    order = np.random.default_rng(1).permutation(len(ROWS))
    shuffled = run_rows_pipeline(_graph(policy, ERASING, []), [IMAGES[i] for i in order], ROWS[order], 4,
                                 batch_size=6, num_threads=2)
    for row, arrays in _by_row(shuffled, ROWS[order]).items():
        assert len(arrays) == len(base[row])
        for k, (got, expected) in enumerate(zip(arrays, base[row])):
            np.testing.assert_array_equal(got, expected, err_msg=f"row {row}, output {k}")
    # another epoch: other draws (policy draws and erasing boxes together)
    other = _by_row(run_rows_pipeline(_graph(policy, ERASING, []), IMAGES, ROWS, 5, batch_size=8), ROWS)
    same = sum(all(np.array_equal(a, b) for a, b in zip(other[row][3:], base[row][3:])) for row in base)
    assert same <= len(ROWS) // 4, same
    assert any(not np.array_equal(other[row][0], base[row][0]) for row in base)


@pytest.mark.slow
def test_pixel_noise_boxes_are_keyed():
    """``'pixel'`` noise values come from DALI's RNG, but where the boxes are is keyed."""
    policy = parse_policy("ta_wide")
    erasing = Erasing.timm(1.0, mode="pixel", max_count=2)
    base = _by_row(run_rows_pipeline(_graph(policy, erasing, []), IMAGES, ROWS, 0, batch_size=8), ROWS)
    order = np.arange(len(ROWS))[::-1]
    other = _by_row(run_rows_pipeline(_graph(policy, erasing, []), [IMAGES[i] for i in order], ROWS[order], 0,
                                      batch_size=12), ROWS[order])
    for row in base:
        for k in (0, 1, 3, 4, 5):  # images before erasing, affine, erase, count, boxes
            np.testing.assert_array_equal(other[row][k], base[row][k])
        outside = ~_box_mask(base[row][5], base[row][2].shape)
        np.testing.assert_array_equal(other[row][2][outside], base[row][2][outside])


def _box_mask(boxes, shape):
    mask = np.zeros(shape[1:], bool)
    for valid, top, left, h, w in boxes.astype(int):
        if valid:
            mask[top:top + h, left:left + w] = True
    return np.broadcast_to(mask, shape)


def _weighted_twin(weights, uniforms):
    """numpy's sequential weighted choice without replacement, as the graph's inverse CDF."""
    weights = np.asarray(weights, np.float32)
    available = np.ones((len(uniforms), len(weights)), np.float32)
    chosen = []
    for u in uniforms.T:
        p = (weights[None, :] * available).astype(np.float64)
        cumulative = np.cumsum(p, axis=1)
        target = u.astype(np.float64) * cumulative[:, -1]
        index = (cumulative[:, :-1] <= target[:, None]).sum(1)
        chosen.append(index)
        available[np.arange(len(index)), index] = 0
    return np.stack(chosen, 1)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["rand-m9-n2-mstd0.5", "rand-m9-n3-mstd101-tweights-p0.7"])
def test_graph_draws_equal_the_python_twin(text):
    policy = parse_policy(text)
    sources = []
    n, epoch = 256, 7
    rows = np.arange(n) * 37 + 11
    images = [np.zeros((8, 8, 3), np.uint8)] * n
    outs = run_rows_pipeline(_graph(policy, ERASING, sources), images, rows, epoch, batch_size=64)
    op, applied, level, negate = (np.stack(outs[6 + DRAW_KEYS.index(k)]) for k in
                                  ("op", "applied", "level", "negate"))
    twin = [keyed_uniforms(SEED, epoch, rows, stream, count) for stream, count in sources[0].streams]
    slots = policy.num_slots
    if policy.weights is None:  # op, applied, noise (Box-Muller pairs), negate
        assert [s for s, _ in sources[0].streams] == [16, 17, 18, 19]
        expected_op = np.minimum(np.floor(twin[0].astype(np.float64) * len(policy.ops)), len(policy.ops) - 1)
        u1, u2 = (twin[2][:, :slots].astype(np.float64), twin[2][:, slots:].astype(np.float64))
        noise = policy.magnitude_std * np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)
        rest = twin[1:]
    else:  # one weighted choice per slot, applied, uniform noise (mstd101), negate
        assert [s for s, _ in sources[0].streams] == list(range(16, 16 + slots + 3))
        expected_op = _weighted_twin(policy.weights, np.concatenate(twin[:slots], axis=1))
        noise = None
        rest = twin[slots:]
    np.testing.assert_array_equal(op, expected_op.astype(np.int32))
    assert all(len(set(r)) == len(r) for r in op) or policy.weights is None
    np.testing.assert_array_equal(applied, (rest[0] <= np.float32(policy.prob)).astype(np.int32))
    if noise is None:
        expected_level = np.clip(policy.magnitude * rest[1].astype(np.float64), 0.0, policy.magnitude_max)
    else:
        expected_level = np.clip(policy.magnitude + noise, 0.0, policy.magnitude_max)
    np.testing.assert_allclose(level, expected_level, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(negate, (rest[2] > 0.5).astype(np.int32))
    # random erasing's first draw: erase or not
    erase = np.stack(outs[3]).astype(bool)
    assert sources[1].streams[0] == (ERASING_STREAM_BASE, 1)
    expected = keyed_uniforms(SEED, epoch, rows, ERASING_STREAM_BASE, 1)[:, 0] <= np.float32(ERASING.prob)
    np.testing.assert_array_equal(erase, expected)


@pytest.mark.slow
def test_keyed_sources_refuse_the_crop_streams_and_overflow():
    from nvidia.dali import fn, pipeline_def
    with pytest.raises(RandomnessError, match="stream_base must be >= 3"):
        KeyedRandom(None, None, seed=0, stream_base=2)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        rows = fn.external_source(source=lambda: np.arange(2), batch=True)
        rng = KeyedRandom(rows, rows, seed=0, stream_base=16, stream_count=2)
        return rng.uniform(), rng.normal((3,)), rng.uniform()

    with pytest.raises(RandomnessError, match="used up its 2 streams from 16"):
        pipe()


def test_rng_and_seed_are_exclusive():
    rng = DaliRandom(3)
    assert resolve(rng, None, 0, "x") is rng
    assert isinstance(resolve(None, 4, 0, "x"), DaliRandom)
    with pytest.raises(RandomnessError, match="apply_policy: give rng= or seed=") as error:
        resolve(rng, 4, 0, "apply_policy")
    assert isinstance(error.value, DaliRelabelError) and isinstance(error.value, ValueError)
    with pytest.raises(RandomnessError, match="KeyedRandom or a DaliRandom"):
        resolve(object(), None, 0, "random_erase")
