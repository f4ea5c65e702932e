"""Modern recipes through the loaders: augmentation policies, random erasing, repeated augmentation,
labels that follow the pixels (checked against the dense reference through ``return_geometry``), and
the drop-in details (last batch, two iterators, DataLoader attributes, wider heads)."""
import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.config import DataConfig
from dali_relabel.loader_state import PassSupersededError
from dali_relabel.ops.reference import reference_warp_pooling
from dali_relabel.store import LabelStore

pytest.importorskip("nvidia.dali")

SMALL = dict(image_size=32, num_threads=1, seed=3)


def _loader(tiny_set, batch_size=8, **settings):
    from dali_relabel.loader import ReLabelLoader

    geometry = settings.pop("return_geometry", True)
    return ReLabelLoader(tiny_set.images, tiny_set.store, batch_size=batch_size, config=DataConfig(**{**SMALL, **settings}),
                         device="cpu", return_rows=True, return_geometry=geometry)


def _expected_targets(tiny_set, rows, geometry, num_classes, image_size, checks=True):
    """The dense reference for each yielded sample: its map pooled over what its pixels show
    (``checks=False``: through the composed affine alone, blind to content a chain of geometric ops
    pushed off the canvas)."""
    store = LabelStore(tiny_set.store)
    maps = store.read(rows.numpy())
    window = geometry["window"].long()
    anchors = torch.stack([window[:, 1], window[:, 0]], 1)  # (y, x)
    shapes = torch.stack([window[:, 3], window[:, 2]], 1)  # (h, w)
    sizes = []
    for row in rows.tolist():  # the decoded image's (H, W)
        with Image.open(f"{tiny_set.images}/{tiny_set.relpaths[row]}") as image:
            sizes.append((image.height, image.width))
    return reference_warp_pooling(torch.as_tensor(maps.logits.astype(np.float32)),
                                  torch.as_tensor(maps.class_ids.astype(np.int64)), anchors, shapes,
                                  torch.tensor(sizes), geometry["affine"].float(), (image_size, image_size),
                                  num_classes, layout=store.layout, flips=geometry["flip"].reshape(-1).long(),
                                  canvas_checks=geometry["canvas_checks"].float() if checks else None)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-n4-p1.0-mstd0.5-inc1", "ta_wide"])
def test_targets_follow_the_pixels_of_the_policy(tiny_set, policy):
    loader = _loader(tiny_set, auto_augment=policy, vflip_probability=0.3)
    moved = chained = corrected = 0
    slots = {"ta_wide": 1, "rand-m9-mstd0.5-inc1": 2}.get(policy, 4)
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    for images, targets, rows, geometry in loader:
        assert geometry["affine"].shape == (len(rows), 2, 3) and geometry["window"].shape == (len(rows), 4)
        assert geometry["canvas_checks"].shape == (len(rows), max(slots - 1, 1), 2, 3)
        moved += int((~torch.isclose(geometry["affine"], identity, atol=1e-6).flatten(1).all(1)).sum())
        chained += int((geometry["canvas_checks"] != identity).flatten(1).any(1).sum())
        expected = _expected_targets(tiny_set, rows, geometry, tiny_set.num_classes, 32)
        torch.testing.assert_close(targets, expected, rtol=1e-5, atol=1e-6)
        composed_only = _expected_targets(tiny_set, rows, geometry, tiny_set.num_classes, 32, checks=False)
        corrected += int(((targets - composed_only).abs().amax(1) > 1e-4).sum())
    assert moved > 0, "some samples ran a geometric op"
    if policy == "ta_wide":  # one op per image: nothing to check
        assert chained == 0 and corrected == 0
    else:  # two geometric ops on some images: what the first pushed off the canvas is left out
        assert chained > 0 and (corrected > 0 or "-n4" not in policy), (chained, corrected)


@pytest.mark.slow
def test_identity_geometry_equals_todays_pooling(tiny_set):
    plain = [(t, r) for _, t, r, _ in _loader(tiny_set)]
    _, _, _, geometry = next(iter(_loader(tiny_set)))
    assert torch.equal(geometry["affine"], torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(len(geometry["affine"]), 2, 3))
    # erasing changes pixels, never targets
    erased = [(t, r) for _, t, r, _ in _loader(tiny_set, random_erase_probability=1.0, random_erase_mode="pixel")]
    for (t0, r0), (t1, r1) in zip(plain, erased):
        assert torch.equal(r0, r1) and torch.equal(t0, t1)


@pytest.mark.slow
def test_augmentation_is_keyed_by_seed_epoch_and_row(tiny_set):
    """The same row in the same epoch gets the same pixels whatever its batch; another epoch not."""
    settings = dict(auto_augment="rand-m9-n2-mstd0.5", random_erase_probability=0.5, return_geometry=False)
    by_row = {}
    for batch_size in (8, 6):
        loader = _loader(tiny_set, batch_size=batch_size, **settings)
        for images, _, rows in loader:
            for image, row in zip(images, rows.tolist()):
                if row in by_row:
                    torch.testing.assert_close(image, by_row[row], rtol=0, atol=1e-6)
                by_row[row] = image
    loader = _loader(tiny_set, **settings)
    loader.set_epoch(1)
    differ = sum(not torch.equal(image, by_row[row]) for images, _, rows in loader
                 for image, row in zip(images, rows.tolist()) if row in by_row)
    assert differ > 0


@pytest.mark.slow
def test_repeated_augmentation_gives_each_copy_its_own_crop(tiny_set):
    loader = _loader(tiny_set, aug_repeats=3, batch_size=6)
    seen = {}
    for _, _, rows, geometry in loader:
        for row, window in zip(rows.tolist(), geometry["window"].tolist()):
            seen.setdefault(row, []).append(tuple(window))
    assert len(loader) == 4 and sum(map(len, seen.values())) == 24  # the epoch keeps its length
    repeated = [w for w in seen.values() if len(w) > 1]
    assert repeated and all(len(set(w)) == len(w) for w in repeated), "each copy draws its own window"


@pytest.mark.slow
def test_wider_head_gets_zero_padded_targets(tiny_set):
    narrow = next(iter(_loader(tiny_set, return_geometry=False)))[1]
    loader = _loader(tiny_set, num_classes=1000, label_smoothing=0.1, return_geometry=False)
    assert loader.num_classes == 1000
    wide = next(iter(loader))[1]
    assert wide.shape == (8, 1000)
    torch.testing.assert_close(wide[:, :12], 0.9 * narrow + 0.1 / 1000)
    assert torch.allclose(wide[:, 12:], torch.full_like(wide[:, 12:], 0.1 / 1000))
    with pytest.raises(ValueError, match="num_classes 5 .* smaller than the data's 12 classes"):
        _loader(tiny_set, num_classes=5)


@pytest.mark.slow
def test_a_second_iterator_ends_the_first_with_a_clear_error(tiny_set):
    loader = _loader(tiny_set, return_geometry=False)
    first = iter(loader)
    next(first)
    second = list(loader)
    assert sum(len(b[2]) for b in second) == 24, "the new pass is whole"
    with pytest.raises(PassSupersededError, match="newer iter"):
        next(first)


@pytest.mark.slow
def test_torchvision_keeps_the_last_partial_batch(tiny_set):
    from dali_relabel.compat import from_torchvision
    from argparse import Namespace

    args = Namespace(auto_augment=None, random_erase=0.0, ra_sampler=False, interpolation="bilinear",
                     train_crop_size=32, val_crop_size=32, val_resize_size=36, mixup_alpha=0.0, cutmix_alpha=0.0)
    train, _ = from_torchvision(args)
    from dali_relabel.loader import ReLabelLoader

    loader = ReLabelLoader(tiny_set.images, tiny_set.store, batch_size=10, config=train.replace(num_threads=1),
                           device="cpu")
    sizes = [len(targets) for _, targets in loader]
    assert sizes == [10, 10, 4] and len(loader) == 3


def test_dataloader_attributes_scripts_read():
    from dali_relabel.loader_state import LoaderState

    assert (LoaderState.pin_memory, LoaderState.collate_fn, LoaderState.generator) == (False, None, None)
    assert LoaderState.persistent_workers is True
    assert isinstance(LoaderState.num_workers, property)
