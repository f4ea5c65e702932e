"""The random draws of a policy, one call per batch (no Python per sample), from a random source.

:func:`draw_slots` gives, per image, ``num_slots`` slots: which op (an index into ``policy.ops``),
whether it runs, its level (timm: the magnitude after noise and clipping; torchvision: the bin) and
whether its magnitude is negated. Every value comes from the source ``rng``
(:mod:`~dali_relabel.augment.randomness`): keyed by ``(seed, epoch, row)`` with a
:class:`~dali_relabel.augment.randomness.KeyedRandom`, DALI's RNG with a
:class:`~dali_relabel.augment.randomness.DaliRandom`. Each family follows its original's draw logic:

- timm RandAugment: ``np.random.choice(ops, n, replace=weights is None, p=weights)``, then per op
  ``random.random() > prob`` skips it, ``random.gauss(m, mstd)`` (or ``random.uniform(0, m)``)
  clipped to ``[0, mmax]``, ``random.random() > 0.5`` negates;
- timm AutoAugment: ``random.choice(policy)``, then the same per op;
- torchvision AutoAugment: ``torch.randint`` sub-policy, stage ``i`` runs when ``rand[i] <= p``,
  negated when ``randint(2) == 0``;
- torchvision RandAugment / TrivialAugmentWide: ops uniformly with replacement, a uniform bin for TA.

The calls on ``rng``, in order (so a :class:`KeyedRandom` takes its streams in this order):
timm RandAugment: ``op`` (``integers(ops, [slots])``, or one ``weighted_choice`` per slot),
``applied`` (``uniform([slots])``, only when ``p < 1``), level noise (``normal([slots])``, or
``uniform([slots])`` for ``mstd`` > 100, only when ``mstd > 0``); AutoAugment: ``sub``
(``integers(len(policy))``), ``applied`` (``uniform([slots])``), timm's level noise; torchvision
RandAugment: ``op``; TrivialAugmentWide: ``op``, the bin (``integers(bins, [slots])``); then for
every family ``negate`` (``uniform([slots]) > 0.5``). :func:`~dali_relabel.augment.apply_policy` then
draws ``GaussianBlurRand``'s radius (``uniform([slots])``) when the policy has that op.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from dali_relabel.augment.constants import f64_constant
from dali_relabel.augment.policies import Policy
from dali_relabel.augment.randomness import Random, resolve

DRAW_SEED_TAG = 0x5A17  # separates seed= draws from random_erase's for the same user seed


def _constant(values, dtype):
    return types.Constant(np.asarray(values), dtype=dtype)


def _level_noise(policy: Policy, base, shape, rng: Random):
    """timm's magnitude: ``base`` (+ N(0, mstd) or ~U(0, base)), clipped to [0, magnitude_max]."""
    base = fn.cast(base, dtype=types.FLOAT64)
    std = policy.magnitude_std
    if std == np.inf:
        level = base * fn.cast(rng.uniform(shape), dtype=types.FLOAT64)
    elif std > 0:
        level = base + rng.normal(shape, std=float(std))
    else:
        level = base
    return dmath.clamp(level, 0.0, float(policy.magnitude_max))


def _weighted_without_replacement(policy: Policy, rng: Random):
    """numpy's ``choice(K, n, replace=False, p=w)``: sequential draws, each from the renormalised rest."""
    k = len(policy.ops)
    weights = _constant(np.asarray(policy.weights, np.float32), types.FLOAT)
    arange = _constant(np.arange(k, dtype=np.int32), types.INT32)
    available = fn.cast(arange * 0 + 1, dtype=types.FLOAT)
    chosen = []
    for _ in range(policy.num_ops):
        op = rng.weighted_choice(weights * available, k)
        chosen.append(op)
        available = available * fn.cast(arange != op, dtype=types.FLOAT)
    return fn.stack(*chosen)


def draw_slots(policy: Policy, rng: Optional[Random] = None, *, seed: Optional[int] = None
               ) -> Dict[str, object]:
    """Per-image slot draws of ``policy`` as DataNodes (CPU), each of shape ``[num_slots]``.

    ``rng``: the random source (:class:`~dali_relabel.augment.randomness.KeyedRandom` or
    :class:`~dali_relabel.augment.randomness.DaliRandom`); ``seed``: shortcut for
    ``DaliRandom(seed, DRAW_SEED_TAG)`` when no ``rng`` is given.

    Keys: ``op`` int32 index into ``policy.ops``; ``applied`` int32 0/1; ``level`` float64;
    ``negate`` int32 0/1; for sub-policy families also ``sub`` (int32 scalar, the sub-policy).
    """
    rng = resolve(rng, seed, DRAW_SEED_TAG, "draw_slots")
    slots = policy.num_slots
    shape = (slots,)
    out: Dict[str, object] = {}
    if policy.family == "timm_rand":
        if policy.weights is None:
            op = rng.integers(len(policy.ops), shape)
        else:
            op = _weighted_without_replacement(policy, rng)
        if policy.prob < 1.0:  # timm: `if prob < 1.0 and random.random() > prob: skip`
            applied = fn.cast(rng.uniform(shape) <= float(policy.prob), dtype=types.INT32)
        else:
            applied = fn.cast(op * 0 + 1, dtype=types.INT32)
        level = _level_noise(policy, fn.cast(op * 0, dtype=types.FLOAT64) + policy.magnitude,
                             shape, rng)
    elif policy.family in ("timm_auto", "tv_auto"):
        subs = policy.sub_policies
        ops = np.zeros((len(subs), slots), np.int32)
        probs = np.zeros((len(subs), slots), np.float32)  # padding stages never run
        mags = np.zeros((len(subs), slots), np.float64)
        for i, sub in enumerate(subs):
            for j, (op_index, p, m) in enumerate(sub):
                ops[i, j], probs[i, j], mags[i, j] = op_index, p, 0.0 if m is None else m
        sub = rng.integers(len(subs))
        op = _constant(ops, types.INT32)[sub]
        prob = _constant(probs, types.FLOAT)[sub]
        u = rng.uniform(shape)
        if policy.family == "timm_auto":  # prob 1.0 always runs (timm skips the draw)
            applied = fn.cast((u <= prob) | (prob >= 1.0), dtype=types.INT32)
            level = _level_noise(policy, f64_constant(mags)[sub], shape, rng)
        else:  # torchvision: `if probs[i] <= p`
            applied = fn.cast(u <= prob, dtype=types.INT32)
            level = f64_constant(mags)[sub]
        out["sub"] = sub
    elif policy.family == "tv_rand":
        op = rng.integers(len(policy.ops), shape)
        applied = fn.cast(op * 0 + 1, dtype=types.INT32)
        level = fn.cast(op * 0, dtype=types.FLOAT64) + policy.magnitude
    elif policy.family == "tv_trivial":
        op = rng.integers(len(policy.ops), shape)
        applied = fn.cast(op * 0 + 1, dtype=types.INT32)
        level = fn.cast(rng.integers(policy.num_bins, shape), dtype=types.FLOAT64)
    else:
        raise ValueError(f"unknown policy family {policy.family!r}")
    # timm: `-v if random.random() > 0.5`; torchvision: `signs[i] == 0` / `torch.randint(2)`
    negate = fn.cast(rng.uniform(shape) > 0.5, dtype=types.INT32)
    out.update(op=op, applied=applied, level=level, negate=negate)
    return out
