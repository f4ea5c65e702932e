"""Where the augmentation's random numbers come from: keyed by ``(seed, epoch, row)``, or DALI's RNG.

Every per-sample decision of :func:`~dali_relabel.augment.apply_policy` and
:func:`~dali_relabel.augment.random_erase` is drawn through one of two objects with the same
methods, each returning CPU DataNodes (one value set per sample, no Python per sample):

- :class:`KeyedRandom` (training): each call is one ``fn.relabel.keyed_uniforms`` operator on its own
  stream of the sample's key, so a sample's draws follow from ``(seed, epoch, row)`` alone: the
  same whatever its batch, batch position, number of DALI threads or ranks, resume point or data
  path (tree or tar shards), as the crop (:mod:`dali_relabel.crops`). The streams are numbered in
  call order from ``stream_base``; :data:`POLICY_STREAM_BASE` and :data:`ERASING_STREAM_BASE` give
  the policy and the erasing disjoint ranges (streams 0-2 are the crop's, the colour jitter's and
  the interpolation's). The Python twin of stream ``s`` is
  ``crops.keyed_uniforms(seed, epoch, rows, s, count)``.
- :class:`DaliRandom` (previews, tests, ``seed=`` callers): DALI's random operators, each with its
  own seed derived from one user seed; the draws depend on the batch order and the pipeline's seed.

Derived draws, the same in both: ``integers(n)`` is ``min(floor(u * n), n - 1)`` for
:class:`KeyedRandom`; ``normal`` Box-Muller ``std * sqrt(-2 ln(1 - u1)) cos(2 pi u2)``;
``weighted_choice`` the inverse CDF over the cumulative sums of the weights.

Per-pixel noise (random erasing's ``'pixel'`` mode, torchvision's ``value='random'``) has a number of
values that varies per sample, so :meth:`pixel_normal` stays on DALI's RNG in both: those noise
values are not keyed (where the boxes are, and every other draw, is).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from dali_relabel.augment.constants import f64_constant
from dali_relabel.errors import DaliRelabelError

POLICY_STREAM_BASE = 16
"""First keyed stream of an augmentation policy's draws (at most 5, or 4 + ``n`` for weighted ops)."""
ERASING_STREAM_BASE = 64
"""First keyed stream of random erasing's draws (at most 6)."""
STREAM_COUNT = 32
"""Streams one :class:`KeyedRandom` may use by default (from its ``stream_base``)."""
_FIRST_FREE_STREAM = 3  # 0-2: crop, colour jitter, interpolation
_INT64 = 1 << 63


class RandomnessError(DaliRelabelError, ValueError):
    """A random source set up wrongly (streams out of range or used up, both ``rng`` and ``seed``)."""


def _shape(shape: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise RandomnessError(f"a draw's shape needs positive extents, got {shape}")
    return shape


def _as_int64(seed: int) -> int:
    """``seed`` modulo 2**64 as a signed int64 (the operator's argument type; the key uses its bits)."""
    seed = int(seed) % (1 << 64)
    return seed - (1 << 64) if seed >= _INT64 else seed


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


class _Derived:
    """The draws both sources derive from their uniforms and integers in the same way."""

    def uniform(self, shape=()):  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    def weighted_choice(self, p, k: int):
        """One index in ``[0, k)`` per sample, chosen with probability ``p[i] / sum(p)``.

        ``p``: float CPU DataNode ``[k]`` per sample (non-negative, not all 0; need not sum to 1).
        Returns an int32 scalar DataNode. A zero weight is never chosen.
        """
        u = fn.cast(self.uniform(), dtype=types.FLOAT64)
        p = fn.cast(p, dtype=types.FLOAT64)
        cumulative, sums = p[0], []
        for i in range(1, k):
            sums.append(cumulative)
            cumulative = cumulative + p[i]
        target = u * cumulative  # < the total (the same sum chain), so trailing zero weights lose
        index = fn.cast(target * 0.0, dtype=types.INT32)
        for partial in sums:  # the number of cumulative sums at or below the target
            index = index + fn.cast(partial <= target, dtype=types.INT32)
        return index


class KeyedRandom(_Derived):
    """Draws keyed by ``(seed, epoch, row)``: ``fn.relabel.keyed_uniforms``, one stream per call.

    Args:
        rows: CPU DataNode of integer scalars, each sample's row (its index in the data set).
        epochs: CPU DataNode of integer scalars, the epoch each sample is read in.
        seed: the run's seed (``DataConfig.seed``); taken modulo 2**64.
        stream_base: the first stream; calls take ``stream_base``, ``stream_base + 1``, ... in order.
            Give the policy and the erasing disjoint ranges: :data:`POLICY_STREAM_BASE`,
            :data:`ERASING_STREAM_BASE`. Must be >= 3 (0-2 are the crop's, the jitter's, the
            interpolation's).
        stream_count: how many streams this source may take; one more raises
            :class:`RandomnessError` rather than overlap the next range.
    """

    def __init__(self, rows, epochs, seed: int, stream_base: int, *, stream_count: int = STREAM_COUNT):
        if int(stream_base) < _FIRST_FREE_STREAM:
            raise RandomnessError(f"keyed streams 0-2 belong to the crop, the colour jitter and the "
                                  f"interpolation; stream_base must be >= 3, got {stream_base}")
        if int(stream_count) < 1:
            raise RandomnessError(f"stream_count must be >= 1, got {stream_count}")
        from dali_relabel.ops.plugin import load_plugin
        load_plugin()
        self.rows, self.epochs = rows, epochs
        self.seed = int(seed)
        self.stream_base, self.stream_count = int(stream_base), int(stream_count)
        self._streams = []
        self._noise_calls = 0

    @property
    def streams(self) -> Tuple[Tuple[int, int], ...]:
        """``(stream, count)`` of each call so far, in call order (the Python twin's arguments)."""
        return tuple(self._streams)

    def _next_stream(self, count: int) -> int:
        stream = self.stream_base + len(self._streams)
        if stream >= self.stream_base + self.stream_count:
            raise RandomnessError(f"keyed random source used up its {self.stream_count} streams from "
                                  f"{self.stream_base}; give it a larger stream_count and a stream_base "
                                  f"range that no other source uses")
        self._streams.append((stream, count))
        return stream

    def uniform(self, shape=()):
        """float32 uniforms in ``[0, 1)`` of ``shape`` per sample (``()``: a scalar)."""
        shape = _shape(shape)
        count = int(np.prod(shape)) if shape else 1
        u = fn.relabel.keyed_uniforms(self.rows, self.epochs, seed=_as_int64(self.seed),
                                      stream=self._next_stream(count), count=count)
        if not shape:
            return u[0]
        return u if len(shape) == 1 else fn.reshape(u, shape=list(shape))

    def integers(self, n: int, shape=()):
        """int32 uniform integers in ``[0, n)``: ``min(floor(u * n), n - 1)``."""
        u = fn.cast(self.uniform(shape), dtype=types.FLOAT64)
        return fn.cast(dmath.min(dmath.floor(u * float(n)), float(n - 1)), dtype=types.INT32)

    def normal(self, shape=(), std: float = 1.0):
        """float64 N(0, std^2) per element: Box-Muller ``sqrt(-2 ln(1 - u1)) cos(2 pi u2)``."""
        shape = _shape(shape)
        pairs = fn.cast(self.uniform((2,) + shape), dtype=types.FLOAT64)
        u1, u2 = pairs[0], pairs[1]
        # float64 constants: DALI would round Python floats (2 pi, std) to float32
        constants = f64_constant([2.0 * np.pi, float(std)])
        two_pi, std = constants[0], constants[1]
        return std * dmath.sqrt(-2.0 * dmath.log(1.0 - u1)) * dmath.cos(two_pi * u2)

    def pixel_normal(self, shape):
        """float32 N(0, 1) noise of a per-sample ``shape`` (int32 DataNode): DALI's RNG, NOT keyed."""
        self._noise_calls += 1
        seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.stream_base,
                                           self._noise_calls]).generate_state(1)[0] & 0x7FFFFFFF)
        return fn.random.normal(shape=shape, dtype=types.FLOAT, seed=seed)


class DaliRandom(_Derived):
    """Draws from DALI's random operators (``fn.random.*``), each seeded from ``seed``.

    Args:
        seed: user seed; each operator gets its own seed derived from ``(seed, tag)``. ``None``:
            DALI's per-operator seeds (from the pipeline's seed).
        tag: separates the seeds of sources built from the same user seed.

    The draws depend on the order samples reach the graph: they are not keyed (see
    :class:`KeyedRandom`).
    """

    def __init__(self, seed: Optional[int] = None, tag: int = 0):
        self.seed, self.tag = seed, tag
        self._seeds = Seeds(seed, tag)

    def uniform(self, shape=()):
        """float32 uniforms in ``[0, 1)`` of ``shape`` per sample (``()``: a scalar)."""
        shape = _shape(shape)
        extra = {"shape": list(shape)} if shape else {}
        return fn.random.uniform(range=[0.0, 1.0], dtype=types.FLOAT, **extra, **self._seeds())

    def integers(self, n: int, shape=()):
        """int32 uniform integers in ``[0, n)``."""
        shape = _shape(shape)
        extra = {"shape": list(shape)} if shape else {}
        return fn.random.uniform(values=list(range(int(n))), dtype=types.INT32, **extra, **self._seeds())

    def normal(self, shape=(), std: float = 1.0):
        """float64 N(0, std^2) per element (drawn in float32)."""
        shape = _shape(shape)
        extra = {"shape": list(shape)} if shape else {}
        noise = fn.random.normal(mean=0.0, stddev=float(std), dtype=types.FLOAT, **extra, **self._seeds())
        return fn.cast(noise, dtype=types.FLOAT64)

    def weighted_choice(self, p, k: int):
        """One index in ``[0, k)`` per sample with probability ``p[i] / sum(p)`` (``fn.random.choice``)."""
        p = fn.cast(p, dtype=types.FLOAT)
        return fn.cast(fn.random.choice(int(k), p=p / fn.reductions.sum(p), **self._seeds()),
                       dtype=types.INT32)

    def pixel_normal(self, shape):
        """float32 N(0, 1) noise of a per-sample ``shape`` (int32 DataNode)."""
        return fn.random.normal(shape=shape, dtype=types.FLOAT, **self._seeds())


Random = Union[KeyedRandom, DaliRandom]


def resolve(rng: Optional[Random], seed: Optional[int], tag: int, what: str) -> Random:
    """``rng``, or a :class:`DaliRandom` of ``(seed, tag)`` when none is given; not both."""
    if rng is None:
        return DaliRandom(seed, tag)
    if seed is not None:
        raise RandomnessError(f"{what}: give rng= or seed=, not both (seed={seed})")
    if not isinstance(rng, (KeyedRandom, DaliRandom)):
        raise RandomnessError(f"{what}: rng must be a KeyedRandom or a DaliRandom, got {type(rng).__name__}")
    return rng
