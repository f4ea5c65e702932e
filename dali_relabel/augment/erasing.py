"""Random erasing (timm's and torchvision's ``RandomErasing``) on the normalised images, in DALI.

Both originals erase after normalisation, on the float CHW tensor: timm's ``'const'`` writes 0 (the
dataset mean), ``'rand'`` one N(0, 1) colour per box and channel, ``'pixel'`` N(0, 1) per pixel;
torchvision writes ``value`` (0 or per channel) or, for ``value='random'``, N(0, 1) per pixel. So
:func:`random_erase` goes after ``crop_mirror_normalize`` (float, ``CHW`` or ``HWC``). Erasing leaves
the geometry, and so the labels, unchanged: it hides pixels, it does not move them.

The draws are timm's ``_erase`` (torchvision's ``get_params`` is the same with one box): with
probability ``prob`` an image gets ``count`` boxes, ``count`` uniform in ``[min_count, max_count]``;
each box tries ``attempts`` (10) times ``area ~ U(area) * H * W / count``, ``aspect = exp(U(log
aspect))``, ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))`` and takes the first
with ``h < H`` and ``w < W`` at ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}`` (no box if none fits).

Every one of these draws, and ``'rand'`` mode's colour per box, comes from the random source ``rng``
(:mod:`~dali_relabel.augment.randomness`; keyed by ``(seed, epoch, row)`` with a ``KeyedRandom``),
drawn for all ``max_count`` box slots at once: ``uniform()`` for ``erase``, ``integers(counts)`` for
``count`` (only when ``min_count < max_count``), ``uniform([max_count, attempts])`` for the area and
the log-aspect, ``uniform([max_count, 2])`` for the corner, ``normal([max_count, 3])`` for ``'rand'``
colours. Per-pixel noise (``'pixel'`` mode, torchvision's ``value='random'``) draws a number of values
that varies per sample and stays on DALI's RNG: its values are NOT keyed (the boxes are).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from dali_relabel.augment.randomness import Random, resolve
from dali_relabel.errors import DaliRelabelError

ERASING_SEED_TAG = 0xE2A5  # separates seed= draws from apply_policy's for the same user seed
MODES = ("const", "rand", "pixel")


class ErasingError(DaliRelabelError, ValueError):
    """Random-erasing settings out of range; the message names the setting."""


@dataclass(frozen=True)
class Erasing:
    """Random-erasing settings (timm's names); see :meth:`timm` and :meth:`torchvision`.

    ``prob`` per image; ``mode`` ``const``/``rand``/``pixel``; ``min_count``..``max_count`` boxes
    (``None``: ``min_count``); ``area`` fraction range of the image per image (divided among the
    boxes); ``aspect`` h/w range (log-uniform); ``value`` the ``const`` fill in normalised units,
    one value or one per channel; ``attempts`` per box.
    """

    prob: float = 0.5
    mode: str = "const"
    min_count: int = 1
    max_count: Optional[int] = None
    area: Tuple[float, float] = (0.02, 1 / 3)
    aspect: Tuple[float, float] = (0.3, 1 / 0.3)
    value: Tuple[float, ...] = (0.0,)
    attempts: int = 10

    @classmethod
    def timm(cls, probability: float = 0.5, min_area: float = 0.02, max_area: float = 1 / 3,
             min_aspect: float = 0.3, max_aspect: Optional[float] = None, mode: str = "const",
             min_count: int = 1, max_count: Optional[int] = None) -> "Erasing":
        """timm's ``RandomErasing(probability, ..., mode, min_count, max_count)`` (``--reprob
        --remode --recount`` give ``probability``, ``mode``, ``max_count``)."""
        return cls(prob=probability, mode=(mode or "const").lower(), min_count=min_count,
                   max_count=max_count, area=(min_area, max_area),
                   aspect=(min_aspect, max_aspect or 1 / min_aspect))

    @classmethod
    def torchvision(cls, p: float = 0.5, scale: Tuple[float, float] = (0.02, 0.33),
                    ratio: Tuple[float, float] = (0.3, 3.3),
                    value: Union[float, Sequence[float], str] = 0) -> "Erasing":
        """torchvision's ``RandomErasing(p, scale, ratio, value)``; ``value='random'`` is per pixel."""
        if isinstance(value, str):
            if value != "random":
                raise ErasingError(f"torchvision erasing value must be a number, a sequence or "
                                   f"'random', got {value!r}")
            return cls(prob=p, mode="pixel", area=tuple(scale), aspect=tuple(ratio))
        values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else (value,)))
        return cls(prob=p, mode="const", area=tuple(scale), aspect=tuple(ratio), value=values)

    @property
    def counts(self) -> Tuple[int, int]:
        return self.min_count, self.max_count or self.min_count

    def validate(self) -> "Erasing":
        """Raise :class:`ErasingError` naming the first setting out of range; return self."""
        lo_count, hi_count = self.counts
        if not 0.0 <= self.prob <= 1.0:
            raise ErasingError(f"erasing probability must be in [0, 1], got {self.prob}")
        if self.mode not in MODES:
            raise ErasingError(f"erasing mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= lo_count <= hi_count:
            raise ErasingError(f"erasing counts need 1 <= min_count <= max_count, got "
                               f"{lo_count}..{hi_count}")
        if not 0.0 < self.area[0] <= self.area[1] <= 1.0:
            raise ErasingError(f"erasing area must satisfy 0 < min <= max <= 1, got {self.area}")
        if not 0.0 < self.aspect[0] <= self.aspect[1]:
            raise ErasingError(f"erasing aspect must satisfy 0 < min <= max, got {self.aspect}")
        if self.attempts < 1:
            raise ErasingError(f"erasing attempts must be >= 1, got {self.attempts}")
        if len(self.value) not in (1, 3):
            raise ErasingError(f"erasing value needs 1 or 3 entries, got {self.value}")
        return self


def _rows(values, rows: int):
    """A per-sample ``[rows, n]`` draw as a list of ``rows`` ``[n]`` DataNodes."""
    return [values[r] for r in range(rows)]


def _boxes(erasing: Erasing, height, width, rng: Random):
    """Per box slot: (valid, top, left, h, w) as float32 per-sample scalars, and the draws."""
    lo_count, hi_count = erasing.counts
    attempts = erasing.attempts
    erase = rng.uniform() <= float(erasing.prob)
    count = (rng.integers(hi_count - lo_count + 1) + lo_count if hi_count > lo_count
             else fn.cast(erase, dtype=types.INT32) * 0 + lo_count)
    count_f = fn.cast(count, dtype=types.FLOAT)
    log_aspect = (math.log(erasing.aspect[0]), math.log(erasing.aspect[1]))
    areas = _rows(rng.uniform((hi_count, attempts)), hi_count)
    aspects = _rows(rng.uniform((hi_count, attempts)), hi_count)
    corners = _rows(rng.uniform((hi_count, 2)), hi_count)
    boxes = []
    for slot in range(hi_count):
        area = float(erasing.area[0]) + float(erasing.area[1] - erasing.area[0]) * areas[slot]
        aspect = dmath.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * aspects[slot])
        target = area * (height * width) / count_f
        hs = dmath.floor(dmath.sqrt(target * aspect) + 0.5)
        ws = dmath.floor(dmath.sqrt(target / aspect) + 0.5)
        fits = fn.cast((hs < height) & (ws < width), dtype=types.FLOAT)
        found = fn.cast(erase, dtype=types.FLOAT) * 0.0
        h = w = found
        for attempt in range(attempts):  # the first attempt that fits
            take = fits[attempt] * (1.0 - found)
            h, w, found = h + take * hs[attempt], w + take * ws[attempt], found + take
        valid = found * fn.cast(erase, dtype=types.FLOAT) * fn.cast(count > slot, dtype=types.FLOAT)
        corner = corners[slot]
        top = dmath.min(dmath.floor(corner[0] * (height - h + 1.0)), height - h)
        left = dmath.min(dmath.floor(corner[1] * (width - w + 1.0)), width - w)
        boxes.append((valid, top * valid, left * valid, h * valid, w * valid))
    return erase, count, boxes


def _box_colours(erasing: Erasing, layout: str, rng: Random):
    """``'rand'`` mode: one N(0, 1) colour per box slot and channel, shaped to broadcast (else None)."""
    if erasing.mode != "rand":
        return [None] * erasing.counts[1]
    hi_count = erasing.counts[1]
    colours = fn.cast(rng.normal((hi_count, 3)), dtype=types.FLOAT)
    shape = [3, 1, 1] if layout == "CHW" else [1, 1, 3]
    return [fn.reshape(colour, shape=shape) for colour in _rows(colours, hi_count)]


def _patch(erasing: Erasing, box, colour, layout: str, channels, height, width, device, rng):
    """The values written into one box, broadcastable to the image: const, per box or per pixel."""
    valid, top, left, h, w = box
    if erasing.mode == "const":
        value = np.asarray(erasing.value, np.float32)
        shape = (-1, 1, 1) if layout == "CHW" else (1, 1, -1)
        return types.Constant(value.reshape(shape), dtype=types.FLOAT, device=device)
    if erasing.mode == "rand":
        return colour.gpu() if device == "gpu" else colour
    size = [dmath.max(h, 1.0), dmath.max(w, 1.0)]  # never empty; invalid boxes are masked out
    size = [channels] + size if layout == "CHW" else size + [channels]
    noise = rng.pixel_normal(fn.cast(fn.stack(*size), dtype=types.INT32))
    if device == "gpu":
        noise = noise.gpu()
    axes = [1, 2] if layout == "CHW" else [0, 1]
    return fn.slice(noise, start=fn.cast(fn.stack(-top, -left), dtype=types.INT32),
                    shape=fn.cast(fn.stack(height, width), dtype=types.INT32), axes=axes,
                    out_of_bounds_policy="pad", fill_values=0.0)


def _erase_boxes(erasing: Erasing, images, boxes, colours, layout, channels, height, width, device,
                 rng):
    for box, colour in zip(boxes, colours):
        valid, top, left, h, w = box
        single = images[0:1] if layout == "CHW" else images[:, :, 0:1]
        mask = fn.erase(fn.zeros_like(single), anchor=fn.stack(top, left), shape=fn.stack(h, w),
                        axes=[1, 2] if layout == "CHW" else [0, 1], fill_value=1.0)
        patch = _patch(erasing, box, colour, layout, channels, height, width, device, rng)
        images = images * (1.0 - mask) + mask * patch  # exact: the box holds the patch values
    return images


def random_erase(images, erasing: Erasing, *, layout: str = "CHW", rng: Optional[Random] = None,
                 seed: Optional[int] = None, debug: bool = False):
    """Erase random boxes of normalised float images inside a DALI graph (``enable_conditionals``).

    Args:
        images: DataNode of float32 images, ``layout`` ``"CHW"`` (crop_mirror_normalize's output)
            or ``"HWC"``, 3 channels, CPU or GPU.
        erasing: the settings (:meth:`Erasing.timm`, :meth:`Erasing.torchvision`); validated here.
        rng: where the draws come from: a :class:`~dali_relabel.augment.randomness.KeyedRandom`
            (training: keyed by ``(seed, epoch, row)``, stream base
            :data:`~dali_relabel.augment.randomness.ERASING_STREAM_BASE`, a range apart from the
            policy's) or a :class:`~dali_relabel.augment.randomness.DaliRandom`. ``'pixel'`` noise
            values come from DALI's RNG either way (not keyed).
        seed: without ``rng``, a ``DaliRandom`` seeded from ``seed`` (``None``: DALI's per-operator
            seeds); not together with ``rng``.
        debug: also return a dict of CPU DataNodes: ``erase`` (bool), ``count`` (int32) and
            ``boxes`` ``[max_count, 5]`` float32 rows ``(valid, top, left, h, w)``.

    Returns:
        The images with the boxes erased (same layout, dtype, device), and the dict with ``debug``.
    """
    erasing = erasing.validate()
    if layout not in ("CHW", "HWC"):
        raise ErasingError(f"random_erase layout must be 'CHW' or 'HWC', got {layout!r}")
    rng = resolve(rng, seed, ERASING_SEED_TAG, "random_erase")
    device = images.device or "cpu"
    shape = images.shape(dtype=types.FLOAT)
    if layout == "CHW":
        channels, height, width = shape[0], shape[1], shape[2]
    else:
        height, width, channels = shape[0], shape[1], shape[2]
    erase, count, boxes = _boxes(erasing, height, width, rng)
    colours = _box_colours(erasing, layout, rng)
    if erase:
        images = _erase_boxes(erasing, images, boxes, colours, layout, channels, height, width,
                              device, rng)
    else:
        images = images
    if not debug:
        return images
    rows = fn.stack(*[fn.stack(*box) for box in boxes])
    return images, {"erase": erase, "count": count, "boxes": rows}
