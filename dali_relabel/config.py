"""Data settings: the one home for every default the pipelines, iterator, CLI and benchmarks share.

A training script builds one :class:`DataConfig`, overrides what it needs (from the command line, a
recipe, or timm's / torchvision's arguments through :mod:`dali_relabel.compat`) and hands it down;
nothing below re-declares these defaults.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import DaliRelabelError

#: ImageNet channel statistics in 0-1 units (torchvision's and timm's convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The box conventions a label map can be pooled with (see docs/store_format.md, "layout").
#: ``"HW"``: map axis 1 runs along the image's height (geometric). ``"WH"``: map axis 1 runs along the
#: image's width, i.e. the map is pooled transposed, as the ReLabel authors' loader does.
LAYOUTS = ("HW", "WH")
#: Image dtypes the loaders hand out.
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
#: Resampling filters; ``"random"`` picks bilinear or bicubic per sample, as timm's default does.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "random")
#: How the last partial batch of an epoch is handled.
LAST_BATCH_POLICIES = ("drop", "pad")
#: The two ReLabel CutMix target recipes (:mod:`dali_relabel.mixing`).
CUTMIX_MODES = ("authors", "localized")
#: One CutMix/Mixup draw per pair of samples, or one for the whole batch (timm's default).
MIX_GRANULARITIES = ("pair", "batch")
#: The most crops one decoded image may give (``DataConfig.crops_per_image``).
MAX_CROPS_PER_IMAGE = 64
#: What random erasing writes into a box (timm's ``--remode``): 0 (the mean), one N(0, 1) colour per
#: box, or N(0, 1) noise per pixel, all in normalised units.
ERASE_MODES = ("const", "rand", "pixel")


class BatchSizeError(DaliRelabelError, ValueError):
    """A training batch size that ``crops_per_image`` does not divide."""


@dataclass
class DataConfig:
    """Settings for the training and validation data paths.

    Attributes:
        image_size: side of the square training and validation crop.
        crop_pct: validation crop share: the shorter side is resized to ``image_size / crop_pct``
            before the centre crop (timm's ``crop_pct``; 0.875 is 224 of 256).
        val_resize: shorter side before the validation centre crop; overrides ``crop_pct``
            (torchvision's ``--val-resize-size``).
        scale: random-resized-crop area range, as fractions of the image area.
        ratio: random-resized-crop aspect-ratio range (w / h), sampled log-uniformly.
        num_attempts: crop draws before the whole-image fallback.
        flip_probability: probability of a horizontal flip.
        interpolation: resampling filter of the training resize (one of :data:`INTERPOLATIONS`).
        val_interpolation: resampling filter of the validation resize (``None``: as ``interpolation``,
            bilinear where that is ``"random"``).
        color_jitter: ``(brightness, contrast, saturation, hue)`` strengths like torchvision's
            ``ColorJitter`` (a single number sets the first three); ``None`` or zeros: off.
        auto_augment: an automatic augmentation policy run on the resized, flipped crop, in the DALI
            graph: timm's strings (``rand-m9-mstd0.5-inc1``, ``rand-m9-n3-mstd0.5-mmax10-p0.8``,
            ``original``, ``originalr``, ``v0``, ``v0r``, ``3a``, each with options as in timm) or
            torchvision's policies (``ta_wide``, ``imagenet``, ``randaugment``/``ra``, ``cifar10``,
            ``svhn``); see :mod:`dali_relabel.augment`. Its geometric ops (rotate, shear, translate)
            move the labels too: the soft target is pooled over what each output pixel shows.
            ``None``: off.
        vflip_probability: probability of a vertical flip (timm's ``--vflip``); labels follow it.
        random_erase_probability: chance that an image gets random erasing after normalisation
            (timm's ``--reprob``, torchvision's ``--random-erase``); targets are unchanged.
        random_erase_mode: what an erased box holds (one of :data:`ERASE_MODES`, timm's ``--remode``).
        random_erase_count: most boxes per erased image, 1 to this many (timm's ``--recount``).
        random_erase_area: range of the erased share of the image (split among the boxes).
        random_erase_aspect: range of a box's aspect ratio h/w (log-uniform).
        aug_repeats: repeated augmentation (timm's ``--aug-repeats``, torchvision's ``--ra-sampler
            --ra-reps``): each sample is read this many times per epoch, each copy with its own crop and
            augmentation, the copies dealt to different ranks, the epoch keeping its length
            (:class:`~dali_relabel.plan.EpochPlan`). 1: off. Tree loaders only.
        crops_per_image: crops cut from each decoded image (FKD's ``--num_crops``): every image is read
            and decoded once and k crops are cut from it, each with its own window, flip, augmentation
            and target (keyed with the key epoch ``epoch * k + j`` for crop j). A batch of B holds B / k
            images x k crops (B must be a multiple of k), crops of one image adjacent; a pass reads each
            image once and yields k samples per image. 1: off (one crop per decode, ROI decoding).
        mean, std: per-channel normalisation in 0-1 units (``(x / 255 - mean) / std``).
        output_dtype: images as one of :data:`OUTPUT_DTYPES`.
        channels_last: images in ``torch.channels_last`` memory format (shape still ``[B, 3, H, W]``).
        output_size: (h, w) grid of the soft target; (1, 1) gives ``[num_classes]`` targets.
        num_classes: width of the targets handed out: ``None`` for the data's classes (the store's,
            or the tree's folders); more pads every target with zeros for the classes the data does
            not have (a model head wider than the data, as timm's ``--num-classes 1000`` over a
            smaller set); fewer is refused.
        temperature: softmax temperature applied to the pooled logits.
        label_smoothing: ``targets = (1 - e) * targets + e / num_classes`` (after mixing).
        layout: ``None`` to use the store's own layout, else ``"HW"`` or ``"WH"`` to override it.
        adjust_orientation: apply EXIF orientation when decoding. Off by default because the
            teachers that made ReLabel maps saw images as PIL loads them (without EXIF rotation).
        hw_decoder_load: share of JPEG decoding given to the GPU's hardware decoder (mixed backend).
        num_threads: DALI CPU threads per pipeline.
        py_num_workers: DALI worker processes running the batch source (one call per batch); 0 (the
            default) runs it in the loader's process, each batch made ahead on a helper thread,
            which the feed benchmark measured as the fastest (no shared-memory hand-over).
        py_start_method: ``"fork"`` or ``"spawn"`` for those processes.
        prefetch_queue_depth: batches prepared ahead.
        worker_timeout: seconds without a batch before the loader calls its pipeline stuck and
            raises, naming its source workers' states (0: wait forever); a dead or stopped worker
            is reported at once.
        seed: base seed; the epoch order, every sample's crop, flip and jitter, and the mixing boxes
            derive from it (and from the epoch and row), never from the rank or the resume point.
        last_batch: ``"drop"`` the last partial batch, or ``"pad"`` it (padded samples are
            marked and removed by the iterator, so nothing is trained on twice).
        cutmix_probability: chance that a pair of samples is CutMix-ed (0 disables CutMix).
        cutmix_alpha: ``lam ~ Beta(alpha, alpha)``.
        cutmix_mode: ``"authors"`` (mix the pooled targets by area) or ``"localized"`` (the pasted
            box's target pooled from the partner's map over exactly that box), see
            :mod:`dali_relabel.mixing`.
        cutmix_stop_epoch: no CutMix (nor Mixup) from this epoch on (the authors switch it off at
            the end).
        mixup_alpha: Mixup on soft targets for the pairs CutMix left alone (0 disables it):
            ``lam ~ Beta(alpha, alpha)``, images and targets both ``lam * own + (1 - lam) * partner``.
        mixup_probability: chance that a pair CutMix left alone is Mixup-ed.
        mix_granularity: ``"pair"`` (every pair draws its own box and weight) or ``"batch"`` (one
            draw for the whole batch, as timm's default ``mode='batch'``).
    """

    image_size: int = 224
    crop_pct: float = 0.875
    val_resize: Optional[int] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_attempts: int = 10
    flip_probability: float = 0.5
    interpolation: str = "bilinear"
    val_interpolation: Optional[str] = None
    color_jitter: Optional[Tuple[float, float, float, float]] = None
    auto_augment: Optional[str] = None
    vflip_probability: float = 0.0
    random_erase_probability: float = 0.0
    random_erase_mode: str = "const"
    random_erase_count: int = 1
    random_erase_area: Tuple[float, float] = (0.02, 1.0 / 3.0)
    random_erase_aspect: Tuple[float, float] = (0.3, 1.0 / 0.3)
    aug_repeats: int = 1
    crops_per_image: int = 1
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    output_dtype: str = "float32"
    channels_last: bool = False
    output_size: Tuple[int, int] = (1, 1)
    num_classes: Optional[int] = None
    temperature: float = 1.0
    label_smoothing: float = 0.0
    layout: Optional[str] = None
    adjust_orientation: bool = False
    hw_decoder_load: float = 0.65
    num_threads: int = 4
    py_num_workers: int = 0
    py_start_method: str = "fork"
    prefetch_queue_depth: int = 2
    worker_timeout: float = 300.0
    seed: int = 0
    last_batch: str = "drop"
    cutmix_probability: float = 0.0
    cutmix_alpha: float = 1.0
    cutmix_mode: str = "authors"
    cutmix_stop_epoch: Optional[int] = None
    mixup_alpha: float = 0.0
    mixup_probability: float = 1.0
    mix_granularity: str = "pair"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def choose(name, allowed, allow_none=False):
            value = getattr(self, name)
            if not (value in allowed or (allow_none and value is None)):
                raise ValueError(f"{name} must be one of {allowed}{' or None' if allow_none else ''}, "
                                 f"got {value!r}")

        choose("layout", LAYOUTS, allow_none=True)
        choose("output_dtype", OUTPUT_DTYPES)
        choose("interpolation", INTERPOLATIONS)
        choose("val_interpolation", tuple(i for i in INTERPOLATIONS if i != "random"), allow_none=True)
        choose("last_batch", LAST_BATCH_POLICIES)
        choose("py_start_method", ("fork", "spawn"))
        if self.py_num_workers < 0:
            raise ValueError(f"py_num_workers must be 0 (the loader's process) or more, got {self.py_num_workers}")
        choose("cutmix_mode", CUTMIX_MODES)
        choose("mix_granularity", MIX_GRANULARITIES)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        if max(self.mean) > 1 or max(self.std) > 1 or min(self.std) <= 0:
            raise ValueError(f"mean and std are given in 0-1 units, as in torchvision and timm (e.g. "
                             f"{IMAGENET_MEAN}); got mean={tuple(self.mean)}, std={tuple(self.std)}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must not be negative, got {self.mixup_alpha}")
        if not 0 <= self.mixup_probability <= 1:
            raise ValueError(f"mixup_probability must lie in [0, 1], got {self.mixup_probability}")
        if not 0 <= self.cutmix_probability <= 1 or self.cutmix_alpha <= 0:
            raise ValueError("cutmix_probability must lie in [0, 1] and cutmix_alpha be positive")
        if self.cutmix_probability > 0 and tuple(self.output_size) != (1, 1):
            raise ValueError("CutMix needs output_size (1, 1)")
        if self.worker_timeout < 0:
            raise ValueError(f"worker_timeout must not be negative, got {self.worker_timeout}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        self.output_size = tuple(int(s) for s in self.output_size)
        if len(self.output_size) != 2 or min(self.output_size) < 1:
            raise ValueError(f"output_size must be two positive ints, got {self.output_size}")
        self.color_jitter = _jitter_strengths(self.color_jitter)
        self._check_augmentation()

    def _check_augmentation(self) -> None:
        """Refuse policy strings, erasing settings and repeats out of range, naming them."""
        if self.auto_augment is not None:
            from .augment.policies import validate_policy

            self.auto_augment = str(self.auto_augment)
            validate_policy(self.auto_augment)
        if not 0 <= self.vflip_probability <= 1:
            raise ValueError(f"vflip_probability must lie in [0, 1], got {self.vflip_probability}")
        if self.aug_repeats < 1:
            raise ValueError(f"aug_repeats must be at least 1, got {self.aug_repeats}")
        if not 1 <= self.crops_per_image <= MAX_CROPS_PER_IMAGE:
            raise ValueError(f"crops_per_image must lie in [1, {MAX_CROPS_PER_IMAGE}], got {self.crops_per_image}")
        self.random_erase_area = tuple(float(v) for v in self.random_erase_area)
        self.random_erase_aspect = tuple(float(v) for v in self.random_erase_aspect)
        self.erasing().validate()

    def images_per_batch(self, batch_size: int) -> int:
        """Images of a training batch of ``batch_size`` crops: ``batch_size / crops_per_image``; a
        batch size that ``crops_per_image`` does not divide is refused (:class:`BatchSizeError`)."""
        crops = int(self.crops_per_image)
        if batch_size < 1 or batch_size % crops:
            raise BatchSizeError(f"batch_size {batch_size} is not a positive multiple of crops_per_image {crops}: a "
                                 f"batch holds batch_size / crops_per_image images x {crops} crops each; choose a "
                                 f"batch size divisible by {crops}")
        return batch_size // crops

    def target_width(self, data_classes: int) -> int:
        """The targets' width for data with ``data_classes`` classes (:attr:`num_classes`)."""
        if self.num_classes is None:
            return data_classes
        if self.num_classes < data_classes:
            raise ValueError(f"num_classes {self.num_classes} (timm's --num-classes) is smaller than the "
                             f"data's {data_classes} classes: the targets cannot be cut; give at least "
                             f"{data_classes} or leave it unset")
        return int(self.num_classes)

    def erasing(self):
        """The random-erasing settings as :class:`~dali_relabel.augment.Erasing`."""
        from .augment.erasing import Erasing

        return Erasing(prob=float(self.random_erase_probability), mode=self.random_erase_mode,
                       min_count=1, max_count=int(self.random_erase_count), area=self.random_erase_area,
                       aspect=self.random_erase_aspect)

    @property
    def moves_pixels(self) -> bool:
        """Whether geometric augmentation runs after the flip (the labels must follow an affine)."""
        return self.auto_augment is not None or self.vflip_probability > 0

    @property
    def resize_size(self) -> int:
        """The validation resize of the shorter side: ``val_resize``, else ``image_size / crop_pct``."""
        return int(self.val_resize) if self.val_resize else int(math.floor(self.image_size / self.crop_pct))

    @property
    def mixing(self) -> bool:
        """Whether CutMix or Mixup is configured at all."""
        return self.cutmix_probability > 0 or (self.mixup_alpha > 0 and self.mixup_probability > 0)

    def replace(self, **changes) -> "DataConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: DataConfig fields that change how the data is made, not what it is: a resume may change them
#: anywhere (threads, workers, queues, timeouts, the hardware decoder's share, the images' memory
#: format and dtype), and ``extra`` (for programs). ``last_batch`` only decides the end of an epoch,
#: which an elastic resume deals out again.
EXECUTION_FIELDS = ("num_threads", "py_num_workers", "py_start_method", "prefetch_queue_depth", "worker_timeout",
                    "hw_decoder_load", "channels_last", "output_dtype", "last_batch", "extra")
#: DataConfig fields that only the validation graph reads.
VALIDATION_FIELDS = ("crop_pct", "val_resize", "val_interpolation")


def data_fingerprint(config: DataConfig, validation: bool = False) -> dict:
    """The settings of ``config`` that define the samples a loader makes (their order's seed, crops,
    augmentation, pixels and targets): every field but :data:`EXECUTION_FIELDS` (and, for training,
    :data:`VALIDATION_FIELDS`), as plain values. A field added later defines the data unless it is
    listed there, so a loader state never silently resumes an epoch with other data."""
    left_out = EXECUTION_FIELDS + (() if validation else VALIDATION_FIELDS)
    return {item.name: _plain(getattr(config, item.name)) for item in dataclasses.fields(config)
            if item.name not in left_out}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return value


def _jitter_strengths(value) -> Optional[Tuple[float, float, float, float]]:
    """``(brightness, contrast, saturation, hue)`` from ``None``, a number or a sequence of 3 or 4."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = (value, value, value, 0.0)
    value = tuple(float(v) for v in value)
    if len(value) == 1:
        value = value * 3
    if len(value) == 3:
        value += (0.0,)
    if len(value) != 4 or min(value) < 0 or value[3] > 0.5:
        raise ValueError(f"color_jitter must be a number or (brightness, contrast, saturation[, hue]) with "
                         f"non-negative strengths and hue at most 0.5, got {value}")
    return None if not any(value) else value


# -- command-line flags from the fields -----------------------------------------------------------
#: Fields the command line does not offer (``extra`` is for programs, not people).
_NOT_FLAGS = ("extra",)
_CHOICES = {"layout": LAYOUTS, "output_dtype": OUTPUT_DTYPES, "interpolation": INTERPOLATIONS,
            "val_interpolation": tuple(i for i in INTERPOLATIONS if i != "random"),
            "last_batch": LAST_BATCH_POLICIES, "py_start_method": ("fork", "spawn"), "cutmix_mode": CUTMIX_MODES,
            "mix_granularity": MIX_GRANULARITIES, "random_erase_mode": ERASE_MODES}


def field_help() -> dict:
    """Each field's description from :class:`DataConfig`'s docstring (``name: text``; ``a, b: text``
    describes both)."""
    import inspect
    import re

    found, names = {}, []
    for line in inspect.getdoc(DataConfig).split("Attributes:", 1)[1].splitlines():
        match = re.match(r"^    ([a-z_, ]+): (.*)$", line)
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                found[name] = match.group(2).strip()
        elif line.startswith("        ") and names:
            for name in names:
                found[name] += " " + line.strip()
    return found


def add_arguments(parser, title: str = "data (DataConfig)") -> None:
    """One ``--flag`` per :class:`DataConfig` field (``image_size`` -> ``--image-size``), with the
    field's default, type, choices and docstring: the command line never re-declares a default."""
    import argparse
    import typing

    hints = typing.get_type_hints(DataConfig)
    helps = field_help()
    group = parser.add_argument_group(title)
    for item in dataclasses.fields(DataConfig):
        if item.name in _NOT_FLAGS:
            continue
        default = item.default
        kind = hints[item.name]
        options = dict(default=default, dest=item.name, help=f"{helps.get(item.name, '')} (default: {default})")
        base = [a for a in typing.get_args(kind) if a is not type(None)]
        inner = base[0] if typing.get_origin(kind) is typing.Union else kind
        if inner is bool:
            options.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(inner) is tuple:
            members = typing.get_args(inner)
            options.update(type=members[0], nargs=len(members) if item.name != "color_jitter" else "+",
                           metavar=item.name.split("_")[-1].upper())
        else:
            options.update(type=inner)
            if item.name in _CHOICES:
                options["choices"] = _CHOICES[item.name]
        group.add_argument("--" + item.name.replace("_", "-"), **options)


def from_arguments(args, **overrides) -> DataConfig:
    """The :class:`DataConfig` of arguments added by :func:`add_arguments` (``overrides`` last)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
              if f.name not in _NOT_FLAGS and hasattr(args, f.name)}
    for name in ("scale", "ratio", "mean", "std", "output_size", "color_jitter", "random_erase_area",
                 "random_erase_aspect"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    values.update(overrides)
    return DataConfig(**values)
