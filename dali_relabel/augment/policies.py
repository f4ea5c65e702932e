"""Policy strings parsed into a declared op list: what each automatic augmentation policy draws.

A :class:`Policy` is plain data: the op table (:class:`OpSpec`, each with its kernel, how a level
becomes the op's argument, and its geometric effect), how ops are drawn (``family``), and the numbers
that steer the draws. :mod:`~dali_relabel.augment.draws` turns it into DALI random ops,
:mod:`~dali_relabel.augment.magnitudes` into arguments, :mod:`~dali_relabel.augment.ops` and
:mod:`~dali_relabel.augment.geometry` into pixels. The tables follow timm 1.0
(``timm/data/auto_augment.py``) and torchvision 0.2x (``torchvision/transforms/autoaugment.py``).

Policy strings (:func:`parse_policy`):

- timm RandAugment ``rand[-m{M}][-n{N}][-mstd{S}][-mmax{X}][-inc{0|1}][-p{P}][-t{weights|3a|3aw}]``:
  ``n`` ops per image chosen with replacement (without replacement under weights, as timm's
  ``np.random.choice``), each applied with probability ``p`` (0.5) at magnitude ``m`` (10) plus
  Gaussian noise of std ``mstd`` (uniform in [0, m] when ``mstd > 100``), clipped to [0, ``mmax``]
  (10 when absent or 0). ``inc1`` uses the ops whose strength increases with the magnitude.
- timm AutoAugment ``original``, ``originalr``, ``v0``, ``v0r``, ``3a`` with an optional ``-mstd{S}``.
- torchvision ``ta_wide`` (``TrivialAugmentWide``, 31 bins), ``imagenet`` / ``cifar10`` / ``svhn``
  (``AutoAugment``), ``randaugment`` or ``ra`` (``RandAugment``: 2 ops, magnitude 9 of 31 bins), the
  last with optional ``-n{N}-m{M}-b{BINS}`` (``ra-m7`` as torchvision's ``--ra-magnitude 7``).

Refused with a :class:`PolicyError` naming the reason: ``augmix`` (not built), timm's removed ``w``
key, unknown keys, unknown names, magnitudes out of range.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from dali_relabel.errors import DaliRelabelError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M maps to the fraction M / 10 of each op's range
TIMM_TRANSLATE_PCT = 0.45  # timm's default translate_pct (create_transform does not override it)
TIMM_FILL = (124, 116, 104)  # timm create_transform: round(255 * IMAGENET_DEFAULT_MEAN)
TORCHVISION_FILL = (0, 0, 0)  # torchvision's fill=None: PIL fills with 0


class PolicyError(DaliRelabelError, ValueError):
    """An augmentation policy string or op name that cannot be built; the message names it."""


@dataclass(frozen=True)
class LevelMap:
    """timm's level -> argument mapping of one op, as data (``LEVEL_TO_ARG`` in timm).

    ``x = (level / 10) * scale``; ``floor`` (timm's ``int()`` of a level >= 0); ``min(cap, x)``;
    ``-x`` with probability 1/2 when ``signed`` (timm's ``_randomly_negate``); ``offset + slope * x``;
    clamp to ``[lo, hi]``. ``None`` bounds are open.
    """

    scale: float
    floor: bool = False
    cap: Optional[float] = None
    signed: bool = False
    offset: float = 0.0
    slope: float = 1.0
    lo: Optional[float] = None
    hi: Optional[float] = None

    def __call__(self, level: float, negate: bool) -> float:
        """The argument for one level in plain Python (the graph computes the same in float64)."""
        x = (level / LEVEL_DENOM) * self.scale
        if self.floor:
            x = float(math.floor(x))
        if self.cap is not None:
            x = min(self.cap, x)
        if self.signed and negate:
            x = -x
        x = self.offset + self.slope * x
        if self.lo is not None:
            x = max(self.lo, x)
        if self.hi is not None:
            x = min(self.hi, x)
        return x


@dataclass(frozen=True)
class BinMap:
    """torchvision's bin -> magnitude table of one op (``_augmentation_space``), as data.

    ``kind`` ``linspace``: ``torch.linspace(lo, hi, bins)[bin]``; ``posterize``:
    ``8 - round(bin / ((bins - 1) / divisor))``; ``translate``: ``int(linspace(0, fraction * size,
    bins)[bin])`` with the image width (``axis`` 1) or height (``axis`` 0); ``none``: 0.
    ``signed``: negated with probability 1/2.
    """

    kind: str
    lo: float = 0.0
    hi: float = 0.0
    signed: bool = False
    divisor: float = 4.0
    axis: int = 1
    offset: float = 0.0  # the op's argument is offset + magnitude (enhancements: 1.0 + m)
    truncate: bool = False  # int() of the magnitude (``_apply_op``'s translations)


@dataclass(frozen=True)
class Geometry:
    """What a geometric op does, as coefficients of its argument ``v`` (all zero: photometric).

    The op's output -> input matrix (pixel centres at i + 0.5) is the rotation by ``rotate * v``
    degrees about the image centre (PIL's ``Image.rotate``), then ``x_in += shear_x * v * y`` and
    ``y_in += shear_y * v * x`` (about the top-left corner), then the translation
    ``(tx * v + tx_w * v * W, ty * v + ty_h * v * H)``.
    """

    rotate: float = 0.0
    shear_x: float = 0.0
    shear_y: float = 0.0
    tx: float = 0.0
    tx_w: float = 0.0
    ty: float = 0.0
    ty_h: float = 0.0

    @property
    def active(self) -> bool:
        return any((self.rotate, self.shear_x, self.shear_y, self.tx, self.tx_w, self.ty, self.ty_h))


@dataclass(frozen=True)
class OpSpec:
    """One op of a policy: the original's name, the DALI kernel, and how its argument is made."""

    name: str
    kernel: str
    level: Optional[LevelMap] = None  # timm families
    bins: Optional[BinMap] = None  # torchvision families
    geometry: Geometry = Geometry()


# Kernels of ops.py; "warp" is every geometric op (geometry.py), "identity" does nothing.
KERNELS = ("identity", "warp", "auto_contrast", "equalize", "invert", "posterize", "solarize",
           "solarize_add", "color", "contrast", "brightness", "sharpness", "desaturate",
           "gaussian_blur")

# --- timm: LEVEL_TO_ARG and NAME_TO_OP ---------------------------------------------------------------
_ENHANCE = LevelMap(scale=1.8, offset=0.1)
_ENHANCE_INC = LevelMap(scale=0.9, signed=True, offset=1.0, lo=0.1)
_TIMM_OPS: Dict[str, OpSpec] = {op.name: op for op in (
    OpSpec("AutoContrast", "auto_contrast"),
    OpSpec("Equalize", "equalize"),
    OpSpec("Invert", "invert"),
    OpSpec("Rotate", "warp", LevelMap(scale=30.0, signed=True), geometry=Geometry(rotate=1.0)),
    OpSpec("Posterize", "posterize", LevelMap(scale=4.0, floor=True)),
    OpSpec("PosterizeIncreasing", "posterize", LevelMap(scale=4.0, floor=True, offset=4.0, slope=-1.0)),
    OpSpec("PosterizeOriginal", "posterize", LevelMap(scale=4.0, floor=True, offset=4.0)),
    OpSpec("Solarize", "solarize", LevelMap(scale=256.0, floor=True, cap=256.0)),
    OpSpec("SolarizeIncreasing", "solarize",
           LevelMap(scale=256.0, floor=True, cap=256.0, offset=256.0, slope=-1.0)),
    OpSpec("SolarizeAdd", "solarize_add", LevelMap(scale=110.0, floor=True, cap=128.0)),
    OpSpec("Color", "color", _ENHANCE),
    OpSpec("ColorIncreasing", "color", _ENHANCE_INC),
    OpSpec("Contrast", "contrast", _ENHANCE),
    OpSpec("ContrastIncreasing", "contrast", _ENHANCE_INC),
    OpSpec("Brightness", "brightness", _ENHANCE),
    OpSpec("BrightnessIncreasing", "brightness", _ENHANCE_INC),
    OpSpec("Sharpness", "sharpness", _ENHANCE),
    OpSpec("SharpnessIncreasing", "sharpness", _ENHANCE_INC),
    # timm's shear_x is PIL (1, f, 0, 0, 1, 0): x_in = x + f * y; translate (1, 0, p, 0, 1, 0): x_in = x + p
    OpSpec("ShearX", "warp", LevelMap(scale=0.3, signed=True), geometry=Geometry(shear_x=1.0)),
    OpSpec("ShearY", "warp", LevelMap(scale=0.3, signed=True), geometry=Geometry(shear_y=1.0)),
    OpSpec("TranslateXRel", "warp", LevelMap(scale=TIMM_TRANSLATE_PCT, signed=True),
           geometry=Geometry(tx_w=1.0)),
    OpSpec("TranslateYRel", "warp", LevelMap(scale=TIMM_TRANSLATE_PCT, signed=True),
           geometry=Geometry(ty_h=1.0)),
    # minmax ops of timm's 3-Augment: Desaturate (0.5, 1.0), GaussianBlur radius (0.1, 2.0),
    # GaussianBlurRand factor (0, 1) whose radius is then uniform in (0.1, 2 * factor)
    OpSpec("Desaturate", "desaturate", LevelMap(scale=0.5, offset=0.5, lo=0.5, hi=1.0)),
    OpSpec("GaussianBlur", "gaussian_blur", LevelMap(scale=1.9, offset=0.1, lo=0.1, hi=2.0)),
    OpSpec("GaussianBlurRand", "gaussian_blur", LevelMap(scale=1.0, lo=0.0, hi=1.0)),
)}

_RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                    "TranslateXRel", "TranslateYRel")
_RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                               "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                               "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                               "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
_RAND_WEIGHTED_3A = {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3,
                     "ShearX": 2, "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1,
                     "ColorIncreasing": 1, "SharpnessIncreasing": 1, "ContrastIncreasing": 1,
                     "BrightnessIncreasing": 1, "Equalize": 1, "Invert": 1}
_RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                    "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
                    "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
                    "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05,
                    "Invert": 0.05}

_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)), (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)), (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)), (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)), (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)), (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)), (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)), (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)), (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)), (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)), (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)), (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)), (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _research_posterize(table, name):
    """timm's ``*r`` variants: the same policy with ``PosterizeIncreasing`` for ``name``."""
    return tuple(tuple(("PosterizeIncreasing" if op == name else op, p, m) for op, p, m in sub)
                 for sub in table)


_TIMM_AUTO = {
    "v0": _V0,
    "v0r": _research_posterize(_V0, "Posterize"),
    "original": _ORIGINAL,
    "originalr": _research_posterize(_ORIGINAL, "PosterizeOriginal"),
    "3a": ((("Solarize", 1.0, 5),), (("Desaturate", 1.0, 10),), (("GaussianBlurRand", 1.0, 10),)),
}

# --- torchvision: _augmentation_space and _apply_op --------------------------------------------------
# torchvision's shear is F.affine(shear=degrees(atan(m)), center=[0, 0]): x_in = x + m * y as timm;
# its translate moves the content by +t pixels: x_in = x - t.
_TV_GEOMETRY = {"ShearX": Geometry(shear_x=1.0), "ShearY": Geometry(shear_y=1.0),
                "TranslateX": Geometry(tx=-1.0), "TranslateY": Geometry(ty=-1.0),
                "Rotate": Geometry(rotate=1.0)}
_TV_KERNEL = {"Identity": "identity", "ShearX": "warp", "ShearY": "warp", "TranslateX": "warp",
              "TranslateY": "warp", "Rotate": "warp", "Brightness": "brightness", "Color": "color",
              "Contrast": "contrast", "Sharpness": "sharpness", "Posterize": "posterize",
              "Solarize": "solarize", "AutoContrast": "auto_contrast", "Equalize": "equalize",
              "Invert": "invert"}
_TV_TRANSLATE_FRACTION = 150.0 / 331.0


def _enhance_bins(hi):
    return BinMap("linspace", 0.0, hi, signed=True, offset=1.0)


def _tv_space(wide: bool, identity: bool, invert: bool) -> Dict[str, BinMap]:
    """torchvision's augmentation space: RandAugment / AutoAugment (``wide=False``) or TA wide."""
    space = {"Identity": BinMap("none")} if identity else {}
    shear, rotate, enhance = (0.99, 135.0, 0.99) if wide else (0.3, 30.0, 0.9)
    translate_x = (BinMap("linspace", 0.0, 32.0, signed=True, truncate=True) if wide
                   else BinMap("translate", 0.0, _TV_TRANSLATE_FRACTION, signed=True, axis=1))
    translate_y = (BinMap("linspace", 0.0, 32.0, signed=True, truncate=True) if wide
                   else BinMap("translate", 0.0, _TV_TRANSLATE_FRACTION, signed=True, axis=0))
    space.update({
        "ShearX": BinMap("linspace", 0.0, shear, signed=True),
        "ShearY": BinMap("linspace", 0.0, shear, signed=True),
        "TranslateX": translate_x,
        "TranslateY": translate_y,
        "Rotate": BinMap("linspace", 0.0, rotate, signed=True),
        "Brightness": _enhance_bins(enhance),
        "Color": _enhance_bins(enhance),
        "Contrast": _enhance_bins(enhance),
        "Sharpness": _enhance_bins(enhance),
        "Posterize": BinMap("posterize", divisor=6.0 if wide else 4.0),
        "Solarize": BinMap("linspace", 255.0, 0.0),
        "AutoContrast": BinMap("none"),
        "Equalize": BinMap("none"),
    })
    if invert:
        space["Invert"] = BinMap("none")
    return space


def _tv_ops(space: Dict[str, BinMap]) -> Tuple[OpSpec, ...]:
    return tuple(OpSpec(name, _TV_KERNEL[name], bins=bins, geometry=_TV_GEOMETRY.get(name, Geometry()))
                 for name, bins in space.items())


_TV_AUTO = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


@dataclass(frozen=True)
class Policy:
    """A parsed policy: the op table and how each image draws from it.

    ``family``:
      - ``timm_rand``: ``num_ops`` slots, each an op from ``ops`` (``weights``: without replacement),
        applied with probability ``prob``, level ``magnitude`` + noise (``magnitude_std``; ``inf``:
        uniform in [0, magnitude]) clipped to [0, ``magnitude_max``];
      - ``timm_auto`` / ``tv_auto``: one of ``sub_policies`` (``(op index, prob, magnitude)`` per
        stage), stages applied with their probabilities (timm adds the same noise as above;
        torchvision's magnitude is a bin, ``None`` as 0);
      - ``tv_rand``: ``num_ops`` ops uniformly, bin ``magnitude`` of ``num_bins``, always applied;
      - ``tv_trivial``: one op uniformly, a bin uniformly in ``[0, num_bins)``.
    ``fill`` is the original's default fill of geometric ops (RGB).
    """

    text: str
    family: str
    ops: Tuple[OpSpec, ...]
    num_ops: int = 1
    magnitude: float = 0.0
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    prob: float = 1.0
    weights: Optional[Tuple[float, ...]] = None
    sub_policies: Tuple[Tuple[Tuple[int, float, Optional[float]], ...], ...] = ()
    num_bins: int = 0
    fill: Tuple[int, int, int] = TIMM_FILL

    @property
    def num_slots(self) -> int:
        """How many ops one image can go through (layers, or stages of the longest sub-policy)."""
        if self.sub_policies:
            return max(len(sub) for sub in self.sub_policies)
        return self.num_ops

    @property
    def op_names(self) -> Tuple[str, ...]:
        return tuple(op.name for op in self.ops)

    @property
    def kernels(self) -> Tuple[str, ...]:
        """The kernels this policy needs, ``identity`` first (the slot that applies nothing)."""
        used = {op.kernel for op in self.ops}
        return tuple(k for k in KERNELS if k == "identity" or k in used)


# --- parsing ----------------------------------------------------------------------------------------
_TIMM_AUTO_NAMES = tuple(_TIMM_AUTO)
_TV_NAMES = ("ta_wide", "imagenet", "cifar10", "svhn", "randaugment", "ra")
SUPPORTED = ("rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}-p{P}-t{weights|3a|3aw}",) + _TIMM_AUTO_NAMES \
    + _TV_NAMES


def _sections(text: str, head: str) -> Sequence[Tuple[str, str]]:
    """timm's ``key{value}`` sections after the head: ``re.split(r'(\\d.*)', section)``."""
    out = []
    for section in text.split("-")[1:]:
        if section.startswith("t") and head == "rand":
            out.append(("t", section[1:]))
            continue
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2:
            raise PolicyError(f"augmentation policy {text!r}: section {section!r} has no value "
                              f"(expected key and number, e.g. 'm9')")
        out.append((parts[0], parts[1]))
    return out


def _number(text: str, key: str, value: str, kind=float):
    try:
        return kind(value)
    except ValueError:
        raise PolicyError(f"augmentation policy {text!r}: {key!r} needs a number, got {value!r}") from None


def _timm_op(name: str) -> OpSpec:
    try:
        return _TIMM_OPS[name]
    except KeyError:
        raise PolicyError(f"unknown augmentation op {name!r}; known: {', '.join(_TIMM_OPS)}") from None


def _parse_timm_rand(text: str) -> Policy:
    magnitude, num_ops, increasing, prob = LEVEL_DENOM, 2, False, 0.5
    mstd, mmax, transforms = 0.0, None, None
    for key, value in _sections(text, "rand"):
        if key == "t":
            if value not in ("weights", "3a", "3aw"):
                raise PolicyError(f"augmentation policy {text!r}: unknown transform set 't{value}' "
                                  f"(known: tweights, t3a, t3aw)")
            transforms = value
        elif key == "mstd":
            mstd = _number(text, key, value)
            if mstd > 100:
                mstd = math.inf  # timm: uniform sampling in [0, m] when mstd > 100
        elif key == "mmax":
            mmax = _number(text, key, value, int)
        elif key == "inc":
            increasing = bool(_number(text, key, value, int))
        elif key == "m":
            magnitude = _number(text, key, value, int)
        elif key == "n":
            num_ops = _number(text, key, value, int)
        elif key == "p":
            prob = _number(text, key, value)
        elif key == "w":
            raise PolicyError(f"augmentation policy {text!r}: timm no longer accepts the 'w' key "
                              f"(its replacement 'tweights' is not equivalent); use '-tweights'")
        else:
            raise PolicyError(f"augmentation policy {text!r}: unknown RandAugment key {key!r} "
                              f"(known: m, n, mstd, mmax, inc, p, t)")
    weights = None
    if transforms == "weights":
        names, weights = zip(*_RAND_WEIGHTED_0.items())
    elif transforms == "3aw":
        names, weights = zip(*_RAND_WEIGHTED_3A.items())
    elif transforms == "3a":
        names = _RAND_3A
    else:
        names = _RAND_INCREASING_TRANSFORMS if increasing else _RAND_TRANSFORMS
    upper = float(mmax) if mmax else LEVEL_DENOM  # timm: `self.magnitude_max or _LEVEL_DENOM`
    if weights is not None:
        total = float(sum(weights))
        weights = tuple(float(w) / total for w in weights)
    policy = Policy(text=text, family="timm_rand", ops=tuple(_timm_op(n) for n in names),
                    num_ops=num_ops, magnitude=float(magnitude), magnitude_std=mstd,
                    magnitude_max=upper, prob=prob, weights=weights, fill=TIMM_FILL)
    if num_ops < 0:
        raise PolicyError(f"augmentation policy {text!r}: n must be >= 0, got {num_ops}")
    if weights is not None and num_ops > len(weights):
        raise PolicyError(f"augmentation policy {text!r}: n{num_ops} ops without replacement from "
                          f"{len(weights)} weighted ops is impossible")
    if not 0.0 <= prob <= 1.0:
        raise PolicyError(f"augmentation policy {text!r}: p must be in [0, 1], got {prob}")
    if magnitude < 0 or (mmax is not None and mmax < 0):
        raise PolicyError(f"augmentation policy {text!r}: magnitudes must be >= 0")
    if magnitude > upper:
        raise PolicyError(f"augmentation policy {text!r}: magnitude m{magnitude} is above the "
                          f"upper bound {upper:g} and would be clipped to it; give mmax{magnitude} "
                          f"to allow it (timm's M > 10) or lower m")
    return policy


def _parse_timm_auto(text: str) -> Policy:
    name = text.split("-")[0]
    mstd = 0.0
    for key, value in _sections(text, name):
        if key == "mstd":
            mstd = _number(text, key, value)
        else:
            raise PolicyError(f"augmentation policy {text!r}: unknown AutoAugment key {key!r} "
                              f"(known: mstd)")
    table = _TIMM_AUTO[name]
    names = tuple(dict.fromkeys(op for sub in table for op, _, _ in sub))
    index = {n: i for i, n in enumerate(names)}
    subs = tuple(tuple((index[op], float(p), float(m)) for op, p, m in sub) for sub in table)
    return Policy(text=text, family="timm_auto", ops=tuple(_timm_op(n) for n in names),
                  magnitude_std=mstd, sub_policies=subs, fill=TIMM_FILL)


def _parse_torchvision(text: str) -> Policy:
    head = text.split("-")[0]
    if head in ("imagenet", "cifar10", "svhn"):
        if text != head:
            raise PolicyError(f"augmentation policy {text!r}: torchvision AutoAugment takes no options")
        table = _TV_AUTO[head]
        ops = _tv_ops(_tv_space(wide=False, identity=False, invert=True))
        index = {op.name: i for i, op in enumerate(ops)}
        subs = tuple(tuple((index[op], float(p), m) for op, p, m in sub) for sub in table)
        return Policy(text=text, family="tv_auto", ops=ops, sub_policies=subs, num_bins=10,
                      fill=TORCHVISION_FILL)
    if head == "ta_wide":
        bins = 31
        for key, value in _sections(text, head):
            if key == "b":
                bins = _number(text, key, value, int)
            else:
                raise PolicyError(f"augmentation policy {text!r}: unknown TrivialAugmentWide key "
                                  f"{key!r} (known: b)")
        if bins < 2:
            raise PolicyError(f"augmentation policy {text!r}: needs at least 2 magnitude bins")
        return Policy(text=text, family="tv_trivial",
                      ops=_tv_ops(_tv_space(wide=True, identity=True, invert=False)),
                      num_bins=bins, fill=TORCHVISION_FILL)
    num_ops, magnitude, bins = 2, 9, 31
    for key, value in _sections(text, head):
        if key == "n":
            num_ops = _number(text, key, value, int)
        elif key == "m":
            magnitude = _number(text, key, value, int)
        elif key == "b":
            bins = _number(text, key, value, int)
        else:
            raise PolicyError(f"augmentation policy {text!r}: unknown RandAugment key {key!r} "
                              f"(known: n, m, b)")
    if bins < 2 or not 0 <= magnitude < bins:
        raise PolicyError(f"augmentation policy {text!r}: magnitude {magnitude} is out of range "
                          f"[0, {bins - 1}] for {bins} bins (torchvision's RandAugment)")
    if num_ops < 0:
        raise PolicyError(f"augmentation policy {text!r}: n must be >= 0, got {num_ops}")
    return Policy(text=text, family="tv_rand",
                  ops=_tv_ops(_tv_space(wide=False, identity=True, invert=False)),
                  num_ops=num_ops, magnitude=float(magnitude), num_bins=bins, fill=TORCHVISION_FILL)


def parse_policy(text: str) -> Policy:
    """The :class:`Policy` of a timm or torchvision policy string (see the module docstring).

    Raises :class:`PolicyError` naming the string, the section or the op when it cannot be built.
    """
    if not isinstance(text, str) or not text.strip():
        raise PolicyError(f"augmentation policy must be a non-empty string, got {text!r}")
    text = text.strip()
    head = text.split("-")[0]
    if head == "rand":
        return _parse_timm_rand(text)
    if head in _TIMM_AUTO:
        return _parse_timm_auto(text)
    if head in _TV_NAMES:
        return _parse_torchvision(text)
    if head == "augmix":
        raise PolicyError(f"augmentation policy {text!r}: AugMix (timm 'augmix-*', torchvision "
                          f"'augmix') is not built: it mixes several augmented copies of each "
                          f"image, which has no single geometry for the labels to follow")
    raise PolicyError(f"unknown augmentation policy {text!r}; known: {', '.join(SUPPORTED)}")


def validate_policy(text: str) -> None:
    """Raise :class:`PolicyError` if ``text`` is not a policy this package builds (for configs)."""
    parse_policy(text)
