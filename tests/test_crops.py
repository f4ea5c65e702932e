"""Keyed crops: the ``relabel.random_crop_window`` operator against its Python twin, the keys, and the
windows' distribution (torchvision's RandomResizedCrop rules)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_relabel.crops import SplitMix64, crop_window, draw_interpolation, draw_jitter, keyed_uniforms, sample_keys

pytest.importorskip("nvidia.dali")


def _constant(value):
    return lambda: value  # no parameter: DALI would pass an iteration number to one


def _run_operator(op_name, inputs, num_outputs, **kwargs):
    """The outputs of ``fn.relabel.<op_name>`` on host arrays ``inputs`` (each ``[B, ...]``)."""
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.ops.plugin import load_plugin

    load_plugin()
    inputs = [np.ascontiguousarray(x) for x in inputs]

    @pipeline_def(batch_size=len(inputs[0]), num_threads=1, device_id=None)
    def graph():
        nodes = [fn.external_source(source=_constant(x), batch=True) for x in inputs]
        outputs = getattr(fn.relabel, op_name)(*nodes, **kwargs)
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

    pipe = graph()
    pipe.build()
    outputs = [out.as_array() for out in pipe.run()]
    assert len(outputs) == num_outputs
    return outputs


def _operator_windows(shapes, rows, epoch, seed, **kwargs):
    """``[(y, x, h, w, mirror)]`` drawn by the operator for image shapes ``[B, 2 or 3]`` and rows ``[B]``."""
    epochs = np.full(len(rows), epoch, np.int64)
    anchor, size, mirror = _run_operator("random_crop_window", [shapes, np.asarray(rows, np.int64), epochs], 3,
                                         seed=seed, **kwargs)
    return [tuple(int(v) for v in (a[0], a[1], s[0], s[1], m)) for a, s, m in zip(anchor, size, mirror)]


@pytest.mark.slow
def test_operator_draws_exactly_what_the_twin_draws():
    rng = np.random.default_rng(0)
    n = 600
    shapes = np.stack([rng.integers(1, 1200, n), rng.integers(1, 1200, n), np.full(n, 3)], axis=1)
    shapes[:20] = [[2000, 30, 3]] * 20  # very tall: the aspect-ratio fallback
    shapes[20:30] = [[1, 1, 3]] * 10
    rows = np.arange(n) * 7 + 3
    got = _operator_windows(shapes, rows, epoch=4, seed=11)
    keys = sample_keys(11, 4, rows)
    expected = [crop_window(int(h), int(w), int(k)) for (h, w, _), k in zip(shapes, keys)]
    assert got == expected


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(lo=st.floats(0.01, 1.0), span=st.floats(0.0, 1.0), r_lo=st.floats(0.2, 1.5), r_span=st.floats(0.0, 3.0),
       attempts=st.integers(0, 12), flip=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**40))
def test_operator_and_twin_agree_for_any_settings(lo, span, r_lo, r_span, attempts, flip, seed):
    rng = np.random.default_rng(seed)
    shapes = np.stack([rng.integers(1, 700, 16), rng.integers(1, 700, 16)], axis=1).astype(np.int32)
    rows, epoch, base = rng.integers(0, 2**40, 16), int(rng.integers(0, 1000)), int(rng.integers(0, 2**62))
    scale, ratio = (lo, min(1.0, lo + span)), (r_lo, r_lo + r_span)
    got = _operator_windows(shapes, rows, epoch, base, random_area=list(scale), random_aspect_ratio=list(ratio),
                            num_attempts=attempts, flip_probability=flip)
    keys = sample_keys(base, epoch, rows)
    expected = [crop_window(int(h), int(w), int(k), scale, ratio, attempts, flip) for (h, w), k in zip(shapes, keys)]
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("strengths", [(0.4, 0.4, 0.4, 0.0), (0.1, 1.5, 0.3, 0.2), (0.0, 0.0, 0.0, 0.5)])
def test_draws_operator_matches_its_twin(strengths):
    rows = np.arange(300) * 13
    jitter, interpolation = _run_operator("sample_draws", [rows, np.full(300, 2, np.int64)], 2, seed=5,
                                          color_jitter=list(strengths))
    keys = sample_keys(5, 2, rows)
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(jitter[i], np.array(draw_jitter(int(key), strengths), np.float32))
        assert int(interpolation[i]) == draw_interpolation(int(key))
    assert 0.4 < interpolation.mean() < 0.6
    s32 = [float(np.float32(v)) for v in strengths]
    for i in range(3):
        assert jitter[:, i].min() >= max(0.0, 1 - s32[i]) and jitter[:, i].max() <= 1 + s32[i]
    assert np.abs(jitter[:, 3]).max() <= 360 * s32[3] + 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("stream, count", [(3, 1), (4, 7), (1000, 33)])
def test_keyed_uniforms_operator_matches_its_twin(stream, count):
    rows = np.arange(500, dtype=np.int64) * 11 + 1
    epochs = np.full(500, 9, np.int64)
    (got,) = _run_operator("keyed_uniforms", [rows, epochs], 1, seed=7, stream=stream, count=count)
    np.testing.assert_array_equal(got, keyed_uniforms(7, 9, rows, stream, count))
    assert got.dtype == np.float32 and got.shape == (500, count)
    assert 0 <= got.min() and got.max() < 1 and abs(float(got.mean()) - 0.5) < 0.05
    # another stream of the same keys is another sequence
    assert not np.array_equal(keyed_uniforms(7, 9, rows, stream + 1, count), got)


@pytest.mark.slow
def test_keyed_uniforms_refuses_the_crop_streams():
    with pytest.raises(RuntimeError, match="use stream 3 or more"):
        _run_operator("keyed_uniforms", [np.arange(2), np.zeros(2, np.int64)], 1, stream=1, count=2)


@pytest.mark.slow
def test_operator_refuses_negative_rows():
    with pytest.raises(RuntimeError, match="row -1 and epoch 0 must not be negative"):
        _operator_windows(np.array([[10, 10]]), [-1], epoch=0, seed=0)


def test_windows_follow_random_resized_crop():
    keys = sample_keys(0, 0, np.arange(4000))
    height, width = 480, 480  # square: accepting a window favours neither orientation
    windows = [crop_window(height, width, int(k)) for k in keys]
    areas, ratios, mirrors = [], [], []
    for y, x, h, w, mirror in windows:
        assert 0 <= y <= height - h and 0 <= x <= width - w and h >= 1 and w >= 1
        areas.append(h * w / (height * width))
        ratios.append(w / h)
        mirrors.append(mirror)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.079 and areas.max() <= 1.0
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    assert 0.47 < np.mean(mirrors) < 0.53
    # log-uniform ratio over a symmetric range: its log averages to 0 (std of the mean ~0.003)
    assert abs(np.mean(np.log(ratios))) < 0.015
    ys = np.array([y / (height - h) for y, x, h, w, _ in windows if h < height])
    assert 0.45 < ys.mean() < 0.55, "positions are uniform over the free range"


def test_fallback_is_the_largest_centred_window_in_the_ratio_range():
    y, x, h, w, _ = crop_window(2000, 30, key=5, attempts=0)
    assert (h, w) == (round(30 / 0.75), 30) and (y, x) == ((2000 - h) // 2, 0)
    y, x, h, w, _ = crop_window(30, 2000, key=5, attempts=0)
    assert (h, w) == (30, round(30 * float(np.float32(4 / 3)))) and x == (2000 - w) // 2
    assert crop_window(300, 320, key=5, attempts=0)[:4] == (0, 0, 300, 320)


def test_keys_are_distinct_per_row_and_change_with_seed_and_epoch():
    rows = np.arange(100_000)
    keys = sample_keys(3, 7, rows)
    assert keys.dtype == np.uint64 and len(np.unique(keys)) == len(rows)
    assert np.array_equal(keys, sample_keys(3, 7, rows))
    assert not np.any(keys == sample_keys(3, 8, rows))
    assert not np.any(keys == sample_keys(4, 7, rows))
    assert sample_keys(3, 7, [5])[0] == keys[5], "a row's key does not depend on its neighbours"


def test_splitmix_matches_the_reference_sequence():
    # The published SplitMix64 outputs for seed 1234567 (Vigna's reference implementation).
    rng = SplitMix64(1234567)
    assert [rng.next() for _ in range(3)] == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert math.isclose(SplitMix64(0).uniform(), (SplitMix64(0).next() >> 11) * 2.0 ** -53)


def test_streams_never_share_a_draw():
    """Every (stream, index) of a key is its own draw: a stream's later indices must not repeat another
    stream's first ones (with salts ``C ^ stream + index``, stream 17's index 1 was stream 16's index 0)."""
    from dali_relabel.crops import sample_uniforms
    keys = sample_keys(5, 0, np.arange(20))
    streams = list(range(1, 130))
    draws = np.concatenate([sample_uniforms(keys, stream, 64) for stream in streams], axis=1)
    for row in draws:
        assert len(np.unique(row)) == len(row)
    # nor are draws of neighbouring streams correlated
    first, second = sample_uniforms(sample_keys(5, 0, np.arange(20_000)), 16, 2), \
        sample_uniforms(sample_keys(5, 0, np.arange(20_000)), 18, 4)
    assert abs(np.corrcoef(first[:, 0], np.cos(2 * np.pi * second[:, 2]))[0, 1]) < 0.05
