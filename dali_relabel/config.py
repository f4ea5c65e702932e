"""Data settings: the one home for every default the pipelines, iterator, CLI and benchmarks share.

A training script builds one :class:`DataConfig`, overrides what it needs (from the command line or
a recipe) and hands it down; nothing below re-declares these defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

#: The box conventions a label map can be pooled with (see docs/store_format.md, "layout").
#: ``"HW"``: map axis 1 runs along the image's height (geometric). ``"WH"``: map axis 1 runs along the
#: image's width, i.e. the map is pooled transposed, as the ReLabel authors' loader does.
LAYOUTS = ("HW", "WH")


@dataclass
class DataConfig:
    """Settings for the training and validation data paths.

    Attributes:
        image_size: side of the square training crop after resize.
        val_resize: shorter side before the validation centre crop.
        scale: random-resized-crop area range, as fractions of the image area.
        ratio: random-resized-crop aspect-ratio range (w / h), sampled log-uniformly.
        num_attempts: crop draws before the whole-image fallback.
        flip_probability: probability of a horizontal flip.
        mean, std: per-channel normalisation, in 0-255 pixel units.
        output_dtype: ``"float16"`` or ``"float32"`` images.
        channels_last: NHWC images instead of NCHW.
        output_size: (h, w) grid of the soft target; (1, 1) gives ``[num_classes]`` targets.
        temperature: softmax temperature applied to the pooled logits.
        layout: ``None`` to use the store's own layout, else ``"HW"`` or ``"WH"`` to override it.
        adjust_orientation: apply EXIF orientation when decoding. Off by default because the
            teachers that made ReLabel maps saw images as PIL loads them (without EXIF rotation).
        hw_decoder_load: share of JPEG decoding given to the GPU's hardware decoder (mixed backend).
        num_threads: DALI CPU threads per pipeline.
        py_num_workers: processes feeding the external source.
        py_start_method: ``"fork"`` or ``"spawn"`` for those processes.
        prefetch_queue_depth: batches prepared ahead.
        seed: base seed; the epoch order and the augmentations derive from it.
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
    """

    image_size: int = 224
    val_resize: int = 256
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    num_attempts: int = 10
    flip_probability: float = 0.5
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    output_dtype: str = "float32"
    channels_last: bool = False
    output_size: Tuple[int, int] = (1, 1)
    temperature: float = 1.0
    layout: Optional[str] = None
    adjust_orientation: bool = False
    hw_decoder_load: float = 0.65
    num_threads: int = 4
    py_num_workers: int = 2
    py_start_method: str = "fork"
    prefetch_queue_depth: int = 2
    seed: int = 0
    last_batch: str = "drop"
    cutmix_probability: float = 0.0
    cutmix_alpha: float = 1.0
    cutmix_mode: str = "authors"
    cutmix_stop_epoch: Optional[int] = None
    mixup_alpha: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or None, got {self.layout!r}")
        if self.output_dtype not in ("float16", "float32"):
            raise ValueError(f"output_dtype must be 'float16' or 'float32', got {self.output_dtype!r}")
        if self.last_batch not in ("drop", "pad"):
            raise ValueError(f"last_batch must be 'drop' or 'pad', got {self.last_batch!r}")
        if self.py_start_method not in ("fork", "spawn"):
            raise ValueError(f"py_start_method must be 'fork' or 'spawn', got {self.py_start_method!r}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.cutmix_mode not in ("authors", "localized"):
            raise ValueError(f"cutmix_mode must be 'authors' or 'localized', got {self.cutmix_mode!r}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must not be negative, got {self.mixup_alpha}")
        if not 0 <= self.cutmix_probability <= 1 or self.cutmix_alpha <= 0:
            raise ValueError("cutmix_probability must lie in [0, 1] and cutmix_alpha be positive")
        if self.cutmix_probability > 0 and tuple(self.output_size) != (1, 1):
            raise ValueError("CutMix needs output_size (1, 1)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        self.output_size = tuple(int(s) for s in self.output_size)
        if len(self.output_size) != 2 or min(self.output_size) < 1:
            raise ValueError(f"output_size must be two positive ints, got {self.output_size}")

    def replace(self, **changes) -> "DataConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
