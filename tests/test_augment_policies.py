"""Policy strings and their declared tables against timm's and torchvision's (no pipelines: fast)."""
import math

import numpy as np
import pytest

from dali_relabel.augment import Erasing, ErasingError, PolicyError, parse_policy, validate_policy
from dali_relabel.augment.magnitudes import bin_values
from dali_relabel.augment.policies import _TIMM_OPS
from dali_relabel.errors import DaliRelabelError

SUPPORTED = ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-n3-mstd101-mmax12-inc1-p0.8",
             "rand-m9-tweights", "rand-m9-t3a", "rand-m9-n2-t3aw", "rand", "original", "originalr",
             "v0", "v0r", "3a", "original-mstd0.5", "ta_wide", "imagenet", "cifar10", "svhn",
             "randaugment", "ra", "ra-m7", "ra-n3-m5-b11"]


@pytest.mark.parametrize("text", SUPPORTED)
def test_supported_policies_parse(text):
    validate_policy(text)
    policy = parse_policy(text)
    assert policy.num_slots >= 1 and policy.ops


@pytest.mark.parametrize("text, words", [
    ("augmix-m5-w4-d2", ["augmix", "not built"]),
    ("augmix", ["augmix"]),
    ("autoaugment", ["unknown augmentation policy", "'autoaugment'"]),
    ("rand-m9-x3", ["unknown RandAugment key 'x'"]),
    ("rand-m9-w0", ["'w' key", "tweights"]),
    ("rand-m9-tfoo", ["'tfoo'"]),
    ("rand-m12", ["m12", "mmax"]),
    ("rand-m9-p1.5", ["p must be in [0, 1]"]),
    ("rand-mx", ["no value"]),
    ("rand-n5-tweights-m9-n20", ["without replacement"]),
    ("original-m9", ["unknown AutoAugment key 'm'"]),
    ("v1", ["unknown augmentation policy 'v1'"]),
    ("ra-m31", ["out of range", "31"]),
    ("ra-m-1", ["no value"]),
    ("imagenet-m3", ["takes no options"]),
    ("ta_wide-q3", ["unknown TrivialAugmentWide key 'q'"]),
    ("", ["non-empty"]),
])
def test_bad_policies_are_refused_by_name(text, words):
    with pytest.raises(PolicyError) as error:
        validate_policy(text)
    assert isinstance(error.value, DaliRelabelError) and isinstance(error.value, ValueError)
    for word in words:
        assert word in str(error.value)


def test_mmax_allows_magnitudes_above_ten():
    policy = parse_policy("rand-m15-mmax20")
    assert policy.magnitude == 15 and policy.magnitude_max == 20
    assert parse_policy("rand-m9-mmax0").magnitude_max == 10  # timm: `magnitude_max or 10`
    assert parse_policy("rand-mstd101").magnitude_std == math.inf
    assert parse_policy("rand-m9-mstd0.5-inc1").op_names[4] == "PosterizeIncreasing"


def test_erasing_validation():
    assert Erasing.timm(0.25, mode="pixel", max_count=3).validate().counts == (1, 3)
    assert Erasing.torchvision(0.1, value="random").mode == "pixel"
    assert Erasing.torchvision(0.1, value=(0.5, 0.1, 0.2)).value == (0.5, 0.1, 0.2)
    for bad, word in [(Erasing(prob=1.5), "probability"), (Erasing(mode="noise"), "mode"),
                      (Erasing(min_count=2, max_count=1), "count"), (Erasing(area=(0.5, 0.1)), "area"),
                      (Erasing(aspect=(0.0, 1.0)), "aspect"), (Erasing(attempts=0), "attempts")]:
        with pytest.raises(ErasingError, match=word):
            bad.validate()
    with pytest.raises(ErasingError, match="random"):
        Erasing.torchvision(value="noise")


# --- against timm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_auto():
    return pytest.importorskip("timm.data.auto_augment")


def test_timm_level_maps_equal_level_to_arg(timm_auto, monkeypatch):
    levels = np.concatenate([np.arange(0, 21, dtype=float), np.linspace(0, 20, 401),
                             np.random.default_rng(0).uniform(0, 20, 500)])
    for name, spec in _TIMM_OPS.items():
        fn = timm_auto.LEVEL_TO_ARG[name]
        assert (fn is None) == (spec.level is None), name
        if fn is None:
            continue
        for negate in (False, True):
            monkeypatch.setattr(timm_auto, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
            for level in levels:
                expected = fn(float(level), dict(timm_auto._HPARAMS_DEFAULT))[0]
                if name == "GaussianBlurRand":  # its radius is drawn later, in the op
                    expected = fn(float(level), {})[0]
                assert spec.level(float(level), negate) == expected, (name, level, negate)


def test_timm_op_lists_and_policies(timm_auto):
    assert parse_policy("rand").op_names == tuple(timm_auto._RAND_TRANSFORMS)
    assert parse_policy("rand-inc1").op_names == tuple(timm_auto._RAND_INCREASING_TRANSFORMS)
    assert parse_policy("rand-t3a").op_names == tuple(timm_auto._RAND_3A)
    for key, table in (("weights", timm_auto._RAND_WEIGHTED_0), ("3aw", timm_auto._RAND_WEIGHTED_3A)):
        policy = parse_policy(f"rand-t{key}")
        names, weights = timm_auto._get_weighted_transforms(table)
        assert policy.op_names == tuple(names)
        np.testing.assert_allclose(policy.weights, weights, rtol=1e-12)
    for name in ("original", "originalr", "v0", "v0r", "3a"):
        policy = parse_policy(name)
        original = timm_auto.auto_augment_policy(name, hparams=dict(timm_auto._HPARAMS_DEFAULT))
        ours = [[(policy.op_names[i], p, m) for i, p, m in sub] for sub in policy.sub_policies]
        theirs = [[(op.name, op.prob, op.magnitude) for op in sub] for sub in original]
        assert ours == theirs, name
    ra = timm_auto.rand_augment_transform("rand-m9-n3-mstd0.5-mmax12-inc1-p0.7",
                                          hparams=dict(timm_auto._HPARAMS_DEFAULT))
    policy = parse_policy("rand-m9-n3-mstd0.5-mmax12-inc1-p0.7")
    assert policy.num_ops == ra.num_layers == 3
    op = ra.ops[0]
    assert (policy.prob, policy.magnitude, policy.magnitude_std, policy.magnitude_max) == \
        (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max)


# --- against torchvision -----------------------------------------------------------------------------
@pytest.mark.parametrize("bins", [31, 11, 5])
def test_torchvision_bin_tables_equal_augmentation_space(bins):
    from torchvision.transforms import autoaugment as tv
    for text, space in (("ta_wide", tv.TrivialAugmentWide(num_magnitude_bins=bins)._augmentation_space(bins)),
                        ("ra", tv.RandAugment(num_magnitude_bins=bins)._augmentation_space(bins, (7, 9)))):
        policy = parse_policy(text if text == "ra" else "ta_wide")
        assert policy.op_names == tuple(space)
        for op in policy.ops:
            magnitudes, signed = space[op.name]
            assert op.bins.signed == signed, op.name
            if op.bins.kind == "translate":
                continue  # size-dependent: checked in the graph tests
            expected = magnitudes.numpy().astype(np.float64) if magnitudes.ndim else np.zeros(bins)
            if op.name.startswith("Translate"):  # _apply_op translates by int(magnitude)
                expected = np.trunc(expected)
            np.testing.assert_array_equal(bin_values(op.bins, bins), expected, err_msg=op.name)


def test_torchvision_autoaugment_tables():
    from torchvision.transforms import autoaugment as tv
    for name in ("imagenet", "cifar10", "svhn"):
        policy = parse_policy(name)
        theirs = tv.AutoAugment(tv.AutoAugmentPolicy(name)).policies
        ours = [tuple((policy.op_names[i], p, m) for i, p, m in sub) for sub in policy.sub_policies]
        assert ours == [tuple(sub) for sub in theirs], name
        assert set(policy.op_names) <= set(tv.AutoAugment()._augmentation_space(10, (8, 8)))
