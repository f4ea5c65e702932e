"""Keyed randomness: every sample's crop and flip follow from ``(seed, epoch, row)`` alone.

Each sample's 64-bit key is :func:`sample_keys` of ``(seed, epoch, row)``; the plugin operator
``fn.relabel.random_crop_window`` (``csrc/crop_window.h``) computes it from the sample's row and epoch
and draws the random-resized-crop window and flip from a SplitMix64 stream started at it. Nothing else enters, so a resumed run, another
number of DALI threads, another batch position or another data path (tree or tar shards) give the
same crop of the same image in the same epoch. :func:`crop_window` is the Python twin of the
operator, used by the tests to check it draw for draw; :func:`draw_jitter` and
:func:`draw_interpolation` are the twins of ``relabel.sample_draws`` (colour jitter and the random
interpolation, other streams of the same key).

With ``DataConfig.crops_per_image`` k > 1 every image gives k crops in one epoch: crop j is keyed
like a sample of its own, with the key epoch :func:`crop_key_epoch` ``epoch * k + j`` in place of the
epoch (with repeated augmentation ``epoch`` is already ``epoch * repeats + copy``), so every crop
draws its own window, flip and augmentation and no two epochs share a key. With k = 1 the key epoch
is the epoch itself.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's step on a uint64 array (wrapping arithmetic): ``finalize(x + gamma)``."""
    z = values + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def crop_key_epoch(epoch: int, crops: int, index: int) -> int:
    """The key epoch of crop ``index`` of the ``crops`` cut from one decoded image in ``epoch`` (the
    source's key epoch): ``epoch * crops + index``; ``epoch`` itself for one crop."""
    if not 0 <= index < crops:
        raise ValueError(f"crop {index} is not one of {crops}")
    return epoch * crops + index


def sample_keys(seed: int, epoch: int, rows) -> np.ndarray:
    """uint64 keys of ``rows`` in ``epoch``: ``mix(mix(mix(seed) + epoch) + row)``.

    Each step is a bijection, so within one (seed, epoch) different rows get different keys.
    """
    base = _mix(np.array([seed & _MASK], dtype=np.uint64))
    base = _mix(base + np.uint64(epoch & _MASK))
    return _mix(np.asarray(rows, dtype=np.int64).astype(np.uint64) + base)


class SplitMix64:
    """The operator's random stream, in Python integers."""

    def __init__(self, key: int):
        self.state = int(key) & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0 ** -53

    def below(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)


def crop_window(height: int, width: int, key: int, scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10,
                flip_probability: float = 0.5) -> Tuple[int, int, int, int, int]:
    """``(y, x, h, w, mirror)`` of an ``height x width`` image for ``key``, as the operator draws it.

    ``scale`` and ``ratio`` are rounded to float32 first, as the operator receives them.
    """
    area_lo, area_hi, ratio_lo, ratio_hi, flip_probability = (
        float(np.float32(v)) for v in (*scale, *ratio, flip_probability))
    rng = SplitMix64(key)
    mirror = int(rng.uniform() < flip_probability)
    area = float(height) * float(width)
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for _ in range(attempts):
        target = area * (area_lo + (area_hi - area_lo) * rng.uniform())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.uniform())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = rng.below(height - h + 1)
            x = rng.below(width - w + 1)
            return y, x, h, w, mirror
    in_ratio = width / height
    w, h = width, height
    if in_ratio < ratio_lo:
        h = round(w / ratio_lo)
    elif in_ratio > ratio_hi:
        w = round(h * ratio_hi)
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    return (height - h) // 2, (width - w) // 2, h, w, mirror


def sample_uniforms(keys, stream: int, count: int) -> np.ndarray:
    """float64 ``[B, count]`` uniforms in ``[0, 1)`` from each sample's key, independent of the crop
    stream and of other ``stream`` numbers (colour jitter: stream 1, interpolation: stream 2)."""
    keys = np.asarray(keys, dtype=np.uint64)
    base = _mix(np.array([0xA0761D6478BD642F ^ stream], dtype=np.uint64))  # mixed: streams never overlap
    salts = _mix(base + np.arange(count, dtype=np.uint64))
    bits = _mix(keys[:, None] ^ salts[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def keyed_uniforms(seed: int, epoch: int, rows, stream: int, count: int) -> np.ndarray:
    """The operator ``relabel.keyed_uniforms``'s float32 ``[B, count]`` draws for ``rows`` in
    ``epoch`` (float64 uniforms rounded to float32, kept below 1)."""
    values = sample_uniforms(sample_keys(seed, epoch, rows), stream, count).astype(np.float32)
    return np.minimum(values, np.float32(np.nextafter(np.float32(1), np.float32(0))))


def draw_jitter(key: int, strengths: Sequence[float]) -> Tuple[float, float, float, float]:
    """The operator ``relabel.sample_draws``'s colour-jitter factors for ``key`` (strengths
    ``(brightness, contrast, saturation, hue)``, rounded to float32 as the operator receives them):
    factors uniform in ``[max(0, 1 - s), 1 + s]``, the hue shift in degrees in ``[-360 h, 360 h]``."""
    s = [float(np.float32(v)) for v in strengths]
    u = sample_uniforms([key], 1, 4)[0]
    factors = [(1 - x if x < 1 else 0.0) + ((1 + x) - (1 - x if x < 1 else 0.0)) * float(u[i])
               for i, x in enumerate(s[:3])]
    hue = (-s[3] + 2 * s[3] * float(u[3])) * 360.0
    return tuple(float(np.float32(v)) for v in (*factors, hue))


def draw_interpolation(key: int) -> int:
    """The operator's interpolation choice for ``key``: 0 bilinear, 1 bicubic."""
    return int(sample_uniforms([key], 2, 1)[0, 0] >= 0.5)
