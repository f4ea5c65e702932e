"""Settings of timm's and torchvision's training scripts map onto DataConfig, or are refused by name."""
from argparse import Namespace

import pytest

from dali_relabel.compat import UnsupportedSetting, from_timm, from_torchvision
from helpers import timm_args

TIMM_DATA = {"input_size": (3, 176, 176), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
             "std": (0.25, 0.25, 0.25), "crop_pct": 0.95}


def test_timm_model_dtype_sets_the_image_dtype():
    assert from_timm(TIMM_DATA, timm_args(model_dtype="bfloat16")).output_dtype == "bfloat16"
    assert from_timm(TIMM_DATA, timm_args(in_chans=3)).output_dtype == "float32"
    with pytest.raises(UnsupportedSetting, match="--in-chans 1 "):
        from_timm(dict(TIMM_DATA, input_size=(1, 64, 64)))
    with pytest.raises(UnsupportedSetting, match="validate.py's --crop-mode"):
        from_timm(dict(TIMM_DATA, crop_mode="squash"))


def test_timm_defaults():
    config = from_timm(TIMM_DATA, timm_args())
    assert config.image_size == 176 and config.crop_pct == 0.95 and config.resize_size == 185
    assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.25, 0.25, 0.25)
    assert config.interpolation == "random" and config.val_interpolation == "bicubic"
    assert config.color_jitter == (0.4, 0.4, 0.4, 0.0) and config.label_smoothing == 0.1
    assert config.seed == 42 and not config.mixing and config.mix_granularity == "batch"


def test_timm_evaluation_only():
    config = from_timm(TIMM_DATA)
    assert config.interpolation == config.val_interpolation == "bicubic" and config.label_smoothing == 0


def test_timm_mixing_probabilities():
    both = from_timm(TIMM_DATA, timm_args(mixup=0.8, cutmix=1.0, mixup_prob=0.6, mixup_switch_prob=0.5))
    assert both.cutmix_probability == pytest.approx(0.3)
    # P(mixup) overall = 0.6 * 0.5 = P(not cutmix) * mixup_probability
    assert (1 - both.cutmix_probability) * both.mixup_probability == pytest.approx(0.3)
    assert (both.cutmix_alpha, both.mixup_alpha) == (1.0, 0.8)
    cutmix = from_timm(TIMM_DATA, timm_args(cutmix=1.0, mixup_mode="pair", mixup_off_epoch=90))
    assert cutmix.cutmix_probability == 1.0 and cutmix.mix_granularity == "pair"
    assert cutmix.cutmix_stop_epoch == 90 and cutmix.mixup_alpha == 0


@pytest.mark.parametrize("change, flag", [
    (dict(aa="augmix-m5-w4-d2"), "--aa"), (dict(aa="rand-m9-zz3"), "--aa 'rand-m9-zz3'.*'zz'"),
    (dict(aa="fancy"), "--aa 'fancy'"),
    (dict(resplit=True), "--resplit"), (dict(train_crop_mode="rkrc"), "--train-crop-mode"),
    (dict(mixup_mode="elem", mixup=0.2), "--mixup-mode"), (dict(cutmix_minmax=[0.2, 0.8]), "--cutmix-minmax"),
    (dict(grayscale_prob=0.1), "--grayscale-prob"), (dict(train_interpolation="box"), "--train-interpolation"),
    (dict(no_aug=True), "--no-aug"), (dict(class_map="map.txt"), "--class-map"), (dict(epoch_repeats=2.0), "--epoch-repeats"),
    (dict(train_img_sizes=[48, 64]), "--train-img-sizes"), (dict(naflex_loader=True), "--naflex-loader"),
    (dict(in_chans=1), "--in-chans"), (dict(input_img_mode="L"), "--input-img-mode"),
    (dict(model_dtype="float64"), "--model-dtype"),
])
def test_timm_settings_we_cannot_honour_are_refused_by_name(change, flag):
    with pytest.raises(UnsupportedSetting, match=flag):
        from_timm(TIMM_DATA, timm_args(**change))


def test_timm_modern_recipe_maps_onto_the_loader():
    config = from_timm(TIMM_DATA, timm_args(aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1,
                                            aug_repeats=3, num_classes=1000, vflip=0.1))
    assert config.auto_augment == "rand-m9-mstd0.5-inc1" and config.color_jitter is None  # timm drops it
    assert (config.random_erase_probability, config.random_erase_mode, config.random_erase_count) == (0.25, "pixel", 1)
    assert config.random_erase_area == pytest.approx((0.02, 1 / 3)) and config.aug_repeats == 3
    assert config.num_classes == 1000 and config.vflip_probability == 0.1
    assert from_timm(TIMM_DATA, timm_args(aa="3a")).color_jitter == (0.4, 0.4, 0.4, 0.0), "3a keeps jitter"


def test_torchvision_modern_recipe_maps_onto_the_loader():
    train, val = from_torchvision(torchvision_args(auto_augment="ta_wide", random_erase=0.1, ra_sampler=True,
                                                   ra_reps=4))
    assert train.auto_augment == "ta_wide" and train.aug_repeats == 4 and train.last_batch == "pad"
    assert (train.random_erase_probability, train.random_erase_mode) == (0.1, "const")
    assert train.random_erase_area == (0.02, 0.33) and train.random_erase_aspect == (0.3, 3.3)
    assert val.auto_augment is None and val.random_erase_probability == 0 and val.aug_repeats == 1
    with pytest.raises(UnsupportedSetting, match="--auto-augment 'augmix'"):
        from_torchvision(torchvision_args(auto_augment="augmix"))


def torchvision_args(**changes):
    defaults = dict(auto_augment=None, random_erase=0.0, ra_sampler=False, interpolation="bilinear",
                    train_crop_size=224, val_crop_size=224, val_resize_size=256, mixup_alpha=0.0, cutmix_alpha=0.0)
    defaults.update(changes)
    return Namespace(**defaults)


def test_torchvision_reference_arguments():
    train, val = from_torchvision(torchvision_args(train_crop_size=176, val_crop_size=224, val_resize_size=232,
                                                   interpolation="bicubic", mixup_alpha=0.2, cutmix_alpha=1.0))
    assert train.image_size == 176 and train.interpolation == "bicubic" and train.label_smoothing == 0
    assert (val.image_size, val.resize_size, val.val_interpolation) == (224, 232, "bicubic")
    assert train.mix_granularity == "batch" and train.cutmix_probability == pytest.approx(0.5)
    assert train.mixup_probability == pytest.approx(1.0)


@pytest.mark.parametrize("change, flag", [(dict(auto_augment="ta_narrow"), "--auto-augment 'ta_narrow'"),
                                          (dict(weights="ResNet50_Weights.V2", test_only=True), "--weights")])
def test_torchvision_settings_we_cannot_honour_are_refused_by_name(change, flag):
    with pytest.raises(UnsupportedSetting, match=flag):
        from_torchvision(torchvision_args(**change))


def test_torchvision_ra_magnitude_reaches_randaugment():
    train, _ = from_torchvision(torchvision_args(auto_augment="ra", ra_magnitude=7))
    assert train.auto_augment == "ra-m7"
    assert from_torchvision(torchvision_args(auto_augment="ra", ra_magnitude=9))[0].auto_augment == "ra"
    assert from_torchvision(torchvision_args(auto_augment="ta_wide", ra_magnitude=7))[0].auto_augment == "ta_wide"
    with pytest.raises(UnsupportedSetting, match="--auto-augment ra --ra-magnitude 31"):
        from_torchvision(torchvision_args(auto_augment="ra", ra_magnitude=31))


def test_torchvision_ra_sampler_repeats_only_when_distributed_as_the_script():
    """The script builds its RASampler only under ``args.distributed``; single-process it samples plainly."""
    recipe = dict(ra_sampler=True, ra_reps=4)
    assert from_torchvision(torchvision_args(distributed=True, **recipe))[0].aug_repeats == 4
    assert from_torchvision(torchvision_args(distributed=False, **recipe))[0].aug_repeats == 1
    assert from_torchvision(torchvision_args(**recipe))[0].aug_repeats == 4  # no init_distributed_mode yet


def test_timm_fractional_aug_repeats_is_refused_not_rounded():
    """timm's RepeatAugSampler resamples for a fractional ``--aug-repeats``; the loader repeats whole times."""
    assert from_timm(TIMM_DATA, timm_args(aug_repeats=3.0)).aug_repeats == 3  # argparse gives a float
    with pytest.raises(UnsupportedSetting, match="--aug-repeats 2.5"):
        from_timm(TIMM_DATA, timm_args(aug_repeats=2.5))
