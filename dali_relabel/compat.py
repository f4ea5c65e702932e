"""Data settings from timm's and torchvision's training scripts, as a :class:`DataConfig`.

:func:`from_timm` maps timm's ``resolve_data_config`` output and its ``train.py`` arguments,
:func:`from_torchvision` the arguments of torchvision's ``references/classification/train.py``. Every
setting either maps onto the DALI path or raises :class:`UnsupportedSetting` naming the flag: nothing
is dropped silently.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .config import DataConfig
from .errors import DaliRelabelError


class UnsupportedSetting(DaliRelabelError, ValueError):
    """A training-script setting the DALI path cannot honour; the message names the flag."""


def _get(args, name: str, default=None):
    return getattr(args, name, default) if args is not None else default


def _refuse(flag: str, value, why: str) -> None:
    raise UnsupportedSetting(f"{flag} {value!r} is not supported by dali-relabel's loader: {why}")


def _square(size, flag: str) -> int:
    height, width = size[-2:] if isinstance(size, (tuple, list)) else (size, size)
    if height != width:
        _refuse(flag, size, "crops are square (image_size x image_size)")
    return int(height)


def _interpolation(name: Optional[str], flag: str, allow_random: bool = True) -> Optional[str]:
    if not name:
        return None
    name = str(name).lower()
    if name == "random" and allow_random:
        return "random"
    if name in ("bilinear", "bicubic", "nearest", "lanczos"):
        return name
    _refuse(flag, name, "choose bilinear, bicubic, nearest, lanczos" + (" or random" if allow_random else ""))
    return None


def _policy(flag: str, policy) -> str:
    """An augmentation policy string, or a refusal naming ``flag`` and what is wrong with it."""
    from .augment.policies import PolicyError, validate_policy

    try:
        validate_policy(str(policy))
    except PolicyError as error:
        raise UnsupportedSetting(f"{flag} {policy!r}: {error}") from None
    return str(policy)


def _mixing(mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float) -> dict:
    """timm's "mix with ``prob``, then CutMix with ``switch_prob`` when both are on" as our chances
    (CutMix per pair or batch, then Mixup for what CutMix left alone)."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cutmix = prob * switch_prob
        mixup = prob * (1 - switch_prob) / (1 - cutmix) if cutmix < 1 else 0.0
        return dict(cutmix_probability=cutmix, cutmix_alpha=cutmix_alpha, mixup_alpha=mixup_alpha,
                    mixup_probability=mixup)
    if cutmix_alpha > 0:
        return dict(cutmix_probability=prob, cutmix_alpha=cutmix_alpha)
    if mixup_alpha > 0:
        return dict(mixup_alpha=mixup_alpha, mixup_probability=prob)
    return {}


def _timm_augmentation(args) -> dict:
    """``--aa``, ``--reprob``/``--remode``/``--recount``, ``--vflip``, ``--aug-repeats`` and
    ``--num-classes`` as :class:`DataConfig` fields (timm's erasing: areas 0.02-1/3, aspect 0.3-1/0.3)."""
    settings = {}
    policy = _get(args, "aa")
    if policy:
        if str(policy).startswith("augmix"):
            _refuse("--aa", policy, "AugMix blends several augmented copies, so no single geometry "
                    "describes a pixel and its label cannot follow; use a rand- or original policy")
        settings["auto_augment"] = _policy("--aa", policy)
    reprob = float(_get(args, "reprob", 0.0) or 0.0)
    if reprob > 0:
        settings.update(random_erase_probability=reprob, random_erase_mode=str(_get(args, "remode", "pixel")),
                        random_erase_count=int(_get(args, "recount", 1) or 1),
                        random_erase_area=(0.02, 1 / 3), random_erase_aspect=(0.3, 1 / 0.3))
    vflip = float(_get(args, "vflip", 0.0) or 0.0)
    if vflip > 0:
        settings["vflip_probability"] = vflip
    repeats = float(_get(args, "aug_repeats", 0) or 0)  # timm parses it as a float
    if repeats != int(repeats):
        _refuse("--aug-repeats", repeats, "each sample is repeated a whole number of times (timm resamples "
                "for a fraction)")
    if repeats > 1:
        settings["aug_repeats"] = int(repeats)
    if _get(args, "num_classes"):
        settings["num_classes"] = int(args.num_classes)
    return settings


def from_timm(data_config: dict, args=None, **overrides) -> DataConfig:
    """A :class:`DataConfig` from timm.

    Args:
        data_config: ``timm.data.resolve_data_config(...)``: ``input_size``, ``interpolation``,
            ``mean``, ``std``, ``crop_pct``.
        args: timm ``train.py``'s parsed arguments (augmentation, mixing, smoothing, seed,
            channels-last); ``None`` for evaluation settings only.
        overrides: :class:`DataConfig` fields set last.
    """
    if int(data_config["input_size"][0]) != 3:  # timm's --in-chans sets the first entry
        _refuse("--in-chans", data_config["input_size"][0], "images are decoded as RGB (3 channels)")
    if data_config.get("crop_mode") not in (None, "center"):  # only validate.py has --crop-mode
        _refuse("validate.py's --crop-mode", data_config["crop_mode"], "validation uses a centre crop")
    settings = dict(image_size=_square(data_config["input_size"], "input_size"),
                    mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                    crop_pct=float(data_config.get("crop_pct") or 0.875))
    val_interpolation = _interpolation(data_config.get("interpolation"), "interpolation", allow_random=False)
    if val_interpolation:
        settings.update(val_interpolation=val_interpolation, interpolation=val_interpolation)
    if args is not None:
        for flag, name, off in (("--aug-splits", "aug_splits", 0), ("--resplit", "resplit", False),
                                ("--color-jitter-prob", "color_jitter_prob", None),
                                ("--grayscale-prob", "grayscale_prob", None),
                                ("--gaussian-blur-prob", "gaussian_blur_prob", None),
                                ("--cutmix-minmax", "cutmix_minmax", None)):
            value = _get(args, name, off)
            if value not in (off, None, 0, False):
                _refuse(flag, value, "the DALI path has no such augmentation; leave it at its default")
        for flag, name, why in (
                ("--class-map", "class_map", "classes are the store's (or the tree's sorted folders)"),
                ("--epoch-repeats", "epoch_repeats", "an epoch is one pass over the data"),
                ("--train-img-sizes", "train_img_sizes", "one crop size (--img-size / --input-size)"),
                ("--train-batch-sizes", "train_batch_sizes", "one batch size"),
                ("--train-batches-per-epoch", "train_batches_per_epoch", "an epoch is one pass over the data"),
                ("--naflex-loader", "naflex_loader", "it is a different loader"),
                ("--in-chans", "in_chans", "images are decoded as RGB (3 channels)")):
            value = _get(args, name)
            if value not in (None, "", 0, 0.0, False) and not (name == "in_chans" and value == 3):
                _refuse(flag, value, why)
        if _get(args, "input_img_mode") not in (None, "RGB"):
            _refuse("--input-img-mode", args.input_img_mode, "images are decoded as RGB")
        if _get(args, "no_aug"):
            _refuse("--no-aug", True, "training always uses random-resized crops and flips (set --scale 1 1 "
                    "--ratio 1 1 --hflip 0 for the nearest thing)")
        if _get(args, "train_crop_mode") not in (None, "rrc"):
            _refuse("--train-crop-mode", args.train_crop_mode, "only random-resized crops (rrc)")
        if _get(args, "mixup_mode", "batch") not in ("batch", "pair"):
            _refuse("--mixup-mode", args.mixup_mode, "mixing is per batch or per pair")
        train_interpolation = _interpolation(_get(args, "train_interpolation"), "--train-interpolation")
        if train_interpolation:
            settings["interpolation"] = train_interpolation
        jitter = _get(args, "color_jitter")
        settings.update(_timm_augmentation(args))
        if settings.get("auto_augment") and "3a" not in settings["auto_augment"] \
                and not _get(args, "force_color_jitter", False):
            jitter = None  # timm drops colour jitter when a policy runs (unless 3a or forced)
        settings.update(
            scale=tuple(_get(args, "scale", (0.08, 1.0))), ratio=tuple(_get(args, "ratio", (3 / 4, 4 / 3))),
            flip_probability=float(_get(args, "hflip", 0.5)),
            color_jitter=tuple(jitter) if isinstance(jitter, (list, tuple)) else jitter,
            label_smoothing=float(_get(args, "smoothing", 0.0) or 0.0),
            mix_granularity="pair" if _get(args, "mixup_mode", "batch") == "pair" else "batch",
            channels_last=bool(_get(args, "channels_last", False)))
        model_dtype = _get(args, "model_dtype")
        if model_dtype:  # a model kept in bfloat16 or float16 needs images of its dtype
            dtypes = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}
            if model_dtype not in dtypes:
                _refuse("--model-dtype", model_dtype, "choose float32, float16 or bfloat16")
            settings["output_dtype"] = dtypes[model_dtype]
        if _get(args, "seed") is not None:
            settings["seed"] = int(args.seed)
        if _get(args, "mixup_off_epoch"):  # timm also flips loader.mixup_enabled, with its prefetcher
            settings["cutmix_stop_epoch"] = int(args.mixup_off_epoch)
        settings.update(_mixing(float(_get(args, "mixup", 0.0) or 0.0), float(_get(args, "cutmix", 0.0) or 0.0),
                                float(_get(args, "mixup_prob", 1.0)), float(_get(args, "mixup_switch_prob", 0.5))))
    settings.update(overrides)
    return DataConfig(**settings)


def from_torchvision(args, **overrides) -> Tuple[DataConfig, DataConfig]:
    """``(train, validation)`` configs from torchvision's ``references/classification/train.py``
    arguments.

    Label smoothing is left to the script's ``CrossEntropyLoss(label_smoothing=...)``, which smooths
    probability targets too (so it is not applied twice). torchvision mixes per batch, choosing
    MixUp or CutMix with equal chance when both are on; so does the returned config. ``--auto-augment
    ra`` takes ``--ra-magnitude``; ``--ra-sampler`` repeats samples (``--ra-reps``) only when
    ``args.distributed`` is not False, as the script builds its ``RASampler`` only then.
    """
    augmentation = {}
    policy = _get(args, "auto_augment")
    if policy:
        if str(policy) == "augmix":
            _refuse("--auto-augment", policy, "AugMix blends several augmented copies, so no single geometry "
                    "describes a pixel and its label cannot follow")
        magnitude = int(_get(args, "ra_magnitude", 9) or 0)
        if str(policy) == "ra" and magnitude != 9:  # the script's RandAugment(magnitude=--ra-magnitude)
            augmentation["auto_augment"] = _policy(f"--auto-augment ra --ra-magnitude {magnitude}",
                                                   f"ra-m{magnitude}")
        else:
            augmentation["auto_augment"] = _policy("--auto-augment", policy)
    erase = float(_get(args, "random_erase", 0.0) or 0.0)
    if erase > 0:  # torchvision's RandomErasing(p) defaults: scale (0.02, 0.33), ratio (0.3, 3.3), value 0
        augmentation.update(random_erase_probability=erase, random_erase_mode="const",
                            random_erase_area=(0.02, 0.33), random_erase_aspect=(0.3, 3.3))
    if _get(args, "ra_sampler", False) and _get(args, "distributed") is not False:
        # the script builds its RASampler only when distributed (args.distributed, set by
        # utils.init_distributed_mode); single-process it samples each image once per epoch
        augmentation["aug_repeats"] = int(_get(args, "ra_reps", 3))
    if _get(args, "weights") and _get(args, "test_only"):
        _refuse("--weights with --test-only", args.weights, "the script would evaluate with the weights' own "
                "transforms; pass their sizes and interpolation as --val-resize-size, --val-crop-size and "
                "--interpolation instead")
    interpolation = _interpolation(_get(args, "interpolation", "bilinear"), "--interpolation",
                                   allow_random=False) or "bilinear"
    mixup, cutmix = float(_get(args, "mixup_alpha", 0.0) or 0.0), float(_get(args, "cutmix_alpha", 0.0) or 0.0)
    # last_batch "pad": its DataLoader keeps the last partial batch (drop_last=False)
    train = DataConfig(**{
        "image_size": int(_get(args, "train_crop_size", 224)), "interpolation": interpolation,
        "val_interpolation": interpolation, "mix_granularity": "batch", "last_batch": "pad",
        **_mixing(mixup, cutmix, 1.0, 0.5), **augmentation, **overrides})
    val = train.replace(auto_augment=None, random_erase_probability=0.0, aug_repeats=1,
                        image_size=int(_get(args, "val_crop_size", 224)),
                        val_resize=int(_get(args, "val_resize_size", 256)))
    return train, val
