"""The random draws of a policy, as DALI random operators (one call per batch, no Python per sample).

:func:`draw_slots` gives, per image, ``num_slots`` slots: which op (an index into ``policy.ops``),
whether it runs, its level (timm: the magnitude after noise and clipping; torchvision: the bin) and
whether its magnitude is negated. Each family follows its original's draw logic:

- timm RandAugment: ``np.random.choice(ops, n, replace=weights is None, p=weights)``, then per op
  ``random.random() > prob`` skips it, ``random.gauss(m, mstd)`` (or ``random.uniform(0, m)``)
  clipped to ``[0, mmax]``, ``random.random() > 0.5`` negates;
- timm AutoAugment: ``random.choice(policy)``, then the same per op;
- torchvision AutoAugment: ``torch.randint`` sub-policy, stage ``i`` runs when ``rand[i] <= p``,
  negated when ``randint(2) == 0``;
- torchvision RandAugment / TrivialAugmentWide: ops uniformly with replacement, a uniform bin for TA.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from dali_relabel.augment.constants import f64_constant
from dali_relabel.augment.policies import Policy


class Seeds:
    """Distinct seeds for the random operators of one graph part, from one user seed (or DALI's)."""

    def __init__(self, seed: Optional[int], tag: int):
        self._states = (None if seed is None
                        else np.random.SeedSequence([int(seed) & 0xFFFFFFFF, tag]).generate_state(64))
        self._next = 0

    def __call__(self) -> Dict[str, int]:
        """Keyword arguments for the next random operator: ``{"seed": s}`` or nothing."""
        if self._states is None:
            return {}
        seed = int(self._states[self._next % len(self._states)] & 0x7FFFFFFF)
        self._next += 1
        return {"seed": seed}


def _constant(values, dtype):
    return types.Constant(np.asarray(values), dtype=dtype)


def _uniform(shape, seeds, lo=0.0, hi=1.0):
    return fn.random.uniform(range=[lo, hi], shape=shape, dtype=types.FLOAT, **seeds())


def _level_noise(policy: Policy, base, shape, seeds):
    """timm's magnitude: ``base`` (+ N(0, mstd) or ~U(0, base)), clipped to [0, magnitude_max]."""
    base = fn.cast(base, dtype=types.FLOAT64)
    std = policy.magnitude_std
    if std == np.inf:
        level = base * fn.cast(_uniform(shape, seeds), dtype=types.FLOAT64)
    elif std > 0:
        noise = fn.random.normal(mean=0.0, stddev=float(std), shape=shape, dtype=types.FLOAT, **seeds())
        level = base + fn.cast(noise, dtype=types.FLOAT64)
    else:
        level = base
    return dmath.clamp(level, 0.0, float(policy.magnitude_max))


def _weighted_without_replacement(policy: Policy, seeds):
    """numpy's ``choice(K, n, replace=False, p=w)``: sequential draws, each from the renormalised rest."""
    k = len(policy.ops)
    weights = _constant(np.asarray(policy.weights, np.float32), types.FLOAT)
    arange = _constant(np.arange(k, dtype=np.int32), types.INT32)
    available = fn.cast(arange * 0 + 1, dtype=types.FLOAT)
    chosen = []
    for _ in range(policy.num_ops):
        p = weights * available
        op = fn.cast(fn.random.choice(k, p=p / fn.reductions.sum(p), **seeds()), dtype=types.INT32)
        chosen.append(op)
        available = available * fn.cast(arange != op, dtype=types.FLOAT)
    return fn.stack(*chosen)


def draw_slots(policy: Policy, seeds: Seeds) -> Dict[str, object]:
    """Per-image slot draws of ``policy`` as DataNodes (CPU), each of shape ``[num_slots]``.

    Keys: ``op`` int32 index into ``policy.ops``; ``applied`` int32 0/1; ``level`` float64;
    ``negate`` int32 0/1; for sub-policy families also ``sub`` (int32 scalar, the sub-policy).
    """
    slots = policy.num_slots
    shape = (slots,)
    out: Dict[str, object] = {}
    if policy.family == "timm_rand":
        if policy.weights is None:
            op = fn.random.uniform(values=list(range(len(policy.ops))), shape=shape,
                                   dtype=types.INT32, **seeds())
        else:
            op = _weighted_without_replacement(policy, seeds)
        if policy.prob < 1.0:  # timm: `if prob < 1.0 and random.random() > prob: skip`
            applied = fn.cast(_uniform(shape, seeds) <= float(policy.prob), dtype=types.INT32)
        else:
            applied = fn.cast(op * 0 + 1, dtype=types.INT32)
        level = _level_noise(policy, fn.cast(op * 0, dtype=types.FLOAT64) + policy.magnitude,
                             shape, seeds)
    elif policy.family in ("timm_auto", "tv_auto"):
        subs = policy.sub_policies
        ops = np.zeros((len(subs), slots), np.int32)
        probs = np.zeros((len(subs), slots), np.float32)  # padding stages never run
        mags = np.zeros((len(subs), slots), np.float64)
        for i, sub in enumerate(subs):
            for j, (op_index, p, m) in enumerate(sub):
                ops[i, j], probs[i, j], mags[i, j] = op_index, p, 0.0 if m is None else m
        sub = fn.random.uniform(values=list(range(len(subs))), dtype=types.INT32, **seeds())
        op = _constant(ops, types.INT32)[sub]
        prob = _constant(probs, types.FLOAT)[sub]
        u = _uniform(shape, seeds)
        if policy.family == "timm_auto":  # prob 1.0 always runs (timm skips the draw)
            applied = fn.cast((u <= prob) | (prob >= 1.0), dtype=types.INT32)
            level = _level_noise(policy, f64_constant(mags)[sub], shape, seeds)
        else:  # torchvision: `if probs[i] <= p`
            applied = fn.cast(u <= prob, dtype=types.INT32)
            level = f64_constant(mags)[sub]
        out["sub"] = sub
    elif policy.family == "tv_rand":
        op = fn.random.uniform(values=list(range(len(policy.ops))), shape=shape, dtype=types.INT32,
                               **seeds())
        applied = fn.cast(op * 0 + 1, dtype=types.INT32)
        level = fn.cast(op * 0, dtype=types.FLOAT64) + policy.magnitude
    elif policy.family == "tv_trivial":
        op = fn.random.uniform(values=list(range(len(policy.ops))), shape=shape, dtype=types.INT32,
                               **seeds())
        applied = fn.cast(op * 0 + 1, dtype=types.INT32)
        level = fn.cast(fn.random.uniform(values=list(range(policy.num_bins)), shape=shape,
                                          dtype=types.INT32, **seeds()), dtype=types.FLOAT64)
    else:
        raise ValueError(f"unknown policy family {policy.family!r}")
    # timm: `-v if random.random() > 0.5`; torchvision: `signs[i] == 0` / `torch.randint(2)`
    negate = fn.cast(_uniform(shape, seeds) > 0.5, dtype=types.INT32)
    out.update(op=op, applied=applied, level=level, negate=negate)
    return out
