"""Levels to op arguments, in the graph: timm's ``LEVEL_TO_ARG`` and torchvision's bin tables.

:func:`slot_argument` gives one slot's per-sample argument (float64, CPU): degrees for rotations,
factors for shears and enhancements, a fraction of the size for timm's relative translations,
pixels for torchvision's, bits for posterize, thresholds for solarize, a radius for blurs.

- timm: the :class:`~dali_relabel.augment.policies.LevelMap` of each op, evaluated in float64 in
  timm's operation order, so a level gives the same argument as timm's Python floats; the op's
  constants are looked up by the per-sample op index, so one expression serves all ops.
  ``GaussianBlurRand`` then draws its radius as ``random.uniform(0.1, 2 * factor)``.
- torchvision: ``torch.linspace`` (and the posterize formula) evaluated at graph build time into a
  ``[ops, bins]`` table (enhancements then ``1.0 + magnitude``, as ``_apply_op``); the translations, whose range depends on the image size, follow
  ``torch.linspace(0, 150/331 * size, bins)`` in float32 and ``int()``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from dali_relabel.augment.constants import f64_constant
from dali_relabel.augment.policies import BinMap, LevelMap, Policy


def _const(values):
    return f64_constant(values)


def _level_table(policy: Policy) -> np.ndarray:
    """``[ops, 9]`` float64: scale, floor, cap, signed, offset, slope, lo, hi, blur_rand."""
    rows = []
    for op in policy.ops:
        m = op.level or LevelMap(scale=0.0)
        rows.append([m.scale, float(m.floor), math.inf if m.cap is None else m.cap, float(m.signed),
                     m.offset, m.slope, -math.inf if m.lo is None else m.lo,
                     math.inf if m.hi is None else m.hi, float(op.name == "GaussianBlurRand")])
    return np.asarray(rows, np.float64)


def bin_values(spec: BinMap, bins: int) -> np.ndarray:
    """torchvision's magnitudes of one op for ``bins`` bins (translations: 0, the graph adds them)."""
    if spec.kind == "linspace":
        values = torch.linspace(spec.lo, spec.hi, bins).numpy().astype(np.float64)
        return np.trunc(values) if spec.truncate else values
    if spec.kind == "posterize":
        bits = 8 - (torch.arange(bins) / ((bins - 1) / spec.divisor)).round().int()
        return bits.numpy().astype(np.float64)
    return np.zeros(bins, np.float64)  # "none" and "translate"


def _timm_argument(policy: Policy, op, level, negate, uniform):
    row = _const(_level_table(policy))[op]
    scale, floor, cap, signed, offset, slope, lo, hi, blur_rand = (row[i] for i in range(9))
    x = (level / 10.0) * scale
    x = floor * dmath.floor(x) + (1.0 - floor) * x
    x = dmath.min(cap, x)
    sign = 1.0 - 2.0 * signed * fn.cast(negate, dtype=types.FLOAT64)
    x = offset + slope * (sign * x)
    x = dmath.max(lo, dmath.min(hi, x))
    if uniform is None:
        return x
    # GaussianBlurRand: random.uniform(0.1, 2.0 * factor) = 0.1 + (2 * factor - 0.1) * random()
    radius = 0.1 + (2.0 * x - 0.1) * fn.cast(uniform, dtype=types.FLOAT64)
    return blur_rand * radius + (1.0 - blur_rand) * x


def _torch_linspace_f32(end, index, bins: int):
    """``torch.linspace(0, end, bins)[index]`` as ATen computes it in float32 (start 0)."""
    end = fn.cast(end, dtype=types.FLOAT)
    step = end / float(bins - 1)
    index = fn.cast(index, dtype=types.FLOAT)
    first_half = fn.cast(index < float(bins // 2), dtype=types.FLOAT)
    value = first_half * (step * index) + (1.0 - first_half) * (end - step * (float(bins - 1) - index))
    return fn.cast(value, dtype=types.FLOAT64)


def _torchvision_argument(policy: Policy, op, level, negate, width, height):
    bins = policy.num_bins
    table = np.stack([bin_values(o.bins, bins) for o in policy.ops])
    bin_index = fn.cast(level, dtype=types.INT32)
    value = _const(table.reshape(-1))[op * bins + bin_index]
    axes = np.array([[o.bins.kind == "translate" and o.bins.axis == 1,
                      o.bins.kind == "translate" and o.bins.axis == 0] for o in policy.ops], np.float64)
    fractions = np.array([o.bins.hi for o in policy.ops], np.float64)
    if axes.any():
        on_w, on_h = (_const(axes[:, i])[op] for i in range(2))
        size = on_w * width + on_h * height
        pixels = dmath.floor(_torch_linspace_f32(_const(fractions)[op] * size, bin_index, bins))
        translate = on_w + on_h
        value = translate * pixels + (1.0 - translate) * value
    signed = _const(np.array([float(o.bins.signed) for o in policy.ops]))[op]
    offset = _const(np.array([o.bins.offset for o in policy.ops]))[op]
    return offset + value * (1.0 - 2.0 * signed * fn.cast(negate, dtype=types.FLOAT64))


def slot_argument(policy: Policy, op, level, negate, width, height, uniform=None):
    """One slot's argument per sample (float64 scalar DataNode on the CPU).

    ``op`` int32 op index, ``level`` float64 (timm level or torchvision bin), ``negate`` int32 0/1,
    ``width``/``height`` float64 image size; ``uniform`` a U[0, 1) draw for ``GaussianBlurRand``.
    """
    if policy.family.startswith("timm"):
        return _timm_argument(policy, op, level, negate, uniform)
    return _torchvision_argument(policy, op, level, negate, width, height)
