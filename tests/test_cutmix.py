"""CutMix with ReLabel targets: boxes, pixel pasting, both target recipes, and the loader wiring."""
import numpy as np
import pytest
import torch

from dali_relabel.config import DataConfig
from dali_relabel.mixing import CutMixSpec, apply_cutmix, box_mask
from dali_relabel.ops.reference import pooled_from_crops, reference_region_pooling

pytest.importorskip("nvidia.dali")


def test_pair_boxes_are_shared_pixel_aligned_and_deterministic():
    spec = CutMixSpec(probability=1.0, alpha=1.0, image_size=32, seed=4)
    for batch_index in range(5):
        boxes = spec.boxes(2, batch_index, 7)
        assert boxes.shape == (7, 4) and boxes.dtype == np.float32
        for i in range(7):
            np.testing.assert_array_equal(boxes[i], boxes[6 - i])
        assert not boxes[3].any(), "the middle sample of an odd batch has no partner"
        for box in boxes[:3]:
            assert np.allclose(box * 32, np.round(box * 32)) and box[2] > box[0] and box[3] > box[1]
    np.testing.assert_array_equal(spec.boxes(2, 1, 7), CutMixSpec(1.0, 1.0, 32, seed=4).boxes(2, 1, 7))
    assert not np.array_equal(spec.boxes(2, 1, 8), spec.boxes(2, 2, 8)), "batches draw their own boxes"
    assert not CutMixSpec(1.0, 1.0, 32, stop_epoch=2).boxes(2, 0, 8).any()
    assert not CutMixSpec(0.0, 1.0, 32).boxes(0, 0, 8).any()
    assert not spec.boxes(0, 0, 1).any(), "a batch of one has no pair"
    boxes = np.concatenate([spec.boxes(0, b, 8)[:4] for b in range(75)])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    assert 0.3 < np.mean(areas) < 0.6, "Beta(1,1) boxes should cover about half the image on average"
    half = CutMixSpec(probability=0.5, alpha=1.0, image_size=32, seed=1)
    mixed = np.mean([half.boxes(0, b, 64)[:32].any(axis=1).mean() for b in range(20)])
    assert 0.4 < mixed < 0.6, f"probability 0.5 mixed {mixed:.2f} of the pairs"


def test_apply_cutmix_pastes_partner_pixels_and_mixes_by_area():
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    boxes = torch.tensor([[0, 0, 0.5, 0.25], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0.5, 0.25]])
    own = torch.eye(4)
    mixed, targets, lam = apply_cutmix(images, boxes, own)
    assert torch.all(mixed[0, :, :4, :2] == 3) and torch.all(mixed[0, :, 4:] == 0)
    assert torch.all(mixed[3, :, :4, :2] == 0) and torch.all(mixed[1] == 1)
    torch.testing.assert_close(lam, torch.tensor([0.875, 1, 1, 0.875]))
    torch.testing.assert_close(targets[0], torch.tensor([0.875, 0, 0, 0.125]))
    torch.testing.assert_close(targets[1], own[1])
    channels_last, _, _ = apply_cutmix(images.permute(0, 2, 3, 1), boxes, own, channels_last=True)
    torch.testing.assert_close(channels_last, mixed.permute(0, 2, 3, 1))
    assert box_mask(boxes, 8, 8)[0].sum() == 8


def _pair_case(seed):
    rng = np.random.default_rng(seed)
    num_classes, batch = 12, 4
    logits = (rng.normal(size=(batch, 3, 5, 6)) * 3).astype(np.float16)
    ids = np.stack([rng.permuted(np.tile(np.arange(num_classes), (30, 1)), axis=1)[:, :3].T.reshape(3, 5, 6)
                    for _ in range(batch)]).astype(np.int64)
    images = np.array([[120, 90, 3], [80, 200, 3], [150, 150, 3], [60, 61, 3]])
    anchors = np.array([[10, 5], [0, 40], [30, 30], [0, 0]], np.int32)
    shapes = np.array([[100, 70], [80, 120], [90, 100], [60, 61]], np.int32)
    flips = np.array([0, 1, 1, 0], np.int32)
    spec = CutMixSpec(1.0, 1.0, 16, seed=seed)
    boxes = spec.boxes(0, 0, batch)
    return num_classes, (logits, ids, anchors, shapes, images, flips), boxes


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_recipes_match_the_reference(seed):
    from dali_relabel.ops.fused import FusedLabelPooling

    num_classes, data, boxes = _pair_case(seed)
    images = torch.zeros(4, 3, 16, 16)
    whole = FusedLabelPooling(num_classes, 4)(*data)
    _, authors, lam = apply_cutmix(images, torch.from_numpy(boxes), whole)
    reference = pooled_from_crops(*data[:5], num_classes, flips=data[5])
    expected = lam.view(-1, 1) * reference + (1 - lam.view(-1, 1)) * reference.flip(0)
    torch.testing.assert_close(authors, expected, rtol=1e-5, atol=1e-6)

    rest = FusedLabelPooling(num_classes, 4, region_mode="outside")(*data, region=boxes)
    box = FusedLabelPooling(num_classes, 4, region_mode="inside")(*data, region=boxes)
    _, localized, _ = apply_cutmix(images, torch.from_numpy(boxes), rest, box)
    ref_rest = reference_region_pooling(*data[:5], boxes, num_classes, mode="outside", flips=data[5])
    ref_box = reference_region_pooling(*data[:5], boxes, num_classes, mode="inside", flips=data[5])
    expected = lam.view(-1, 1) * ref_rest + (1 - lam.view(-1, 1)) * ref_box.flip(0)
    torch.testing.assert_close(localized, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(localized.sum(1), torch.ones(4))


def _pixel_rows(image, config):
    """Row id encoded by each pixel's colour (see test_loader.make_id_dataset)."""
    from test_loader import STEP

    rgb = image.float() * (255 * torch.tensor(config.std)).view(3, 1, 1) + (255 * torch.tensor(config.mean)).view(3, 1, 1)
    return (torch.round((rgb[1] - 20) / STEP) * 10 + torch.round((rgb[0] - 20) / STEP)).long()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["authors", "localized"])
def test_loader_mixes_pairs_with_their_own_partners(mode, tmp_path):
    from dali_relabel.loader import ReLabelLoader
    from test_loader import make_id_dataset

    image_root, store = make_id_dataset(str(tmp_path), 16)
    config = DataConfig(image_size=32, num_threads=1, cutmix_probability=1.0,
                        cutmix_mode=mode, seed=5)
    loader = ReLabelLoader(image_root, store, batch_size=8, config=config, device="cpu", return_rows=True)
    mixed_samples = 0
    for images, targets, rows in loader:
        partner_rows = rows.flip(0)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(rows)))
        for i in range(len(rows)):
            weights = targets[i]
            own, other = int(rows[i]), int(partner_rows[i])
            if own == other or weights[own] > 0.999:
                continue
            mixed_samples += 1
            # Each map puts ~all mass on its own row's class: the mix is between exactly these two.
            assert weights[own] + weights[other] > 0.99, (own, other, weights)
            # The partner's pixels fill the box, and the box's share of the image is the mix weight.
            pixel_rows = _pixel_rows(images[i], config)
            assert set(pixel_rows.unique().tolist()) == {own, other}
            share = float((pixel_rows == other).float().mean())
            assert abs(share - float(weights[other] / (weights[own] + weights[other]))) < 0.01
    assert mixed_samples >= 8


def test_mixup_weights_are_shared_by_pairs_and_reproducible():
    from dali_relabel.mixing import apply_mixup, mixup_weights

    lam = mixup_weights(5, 0.4, seed=1, epoch=2, batch_index=3)
    torch.testing.assert_close(lam, lam.flip(0))
    torch.testing.assert_close(lam, mixup_weights(5, 0.4, seed=1, epoch=2, batch_index=3))
    assert not torch.equal(lam, mixup_weights(5, 0.4, seed=1, epoch=2, batch_index=4))
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    targets = torch.eye(4)
    weights = torch.tensor([0.7, 0.6, 0.6, 0.7])
    mask = torch.tensor([True, False, False, True])
    mixed, mixed_targets = apply_mixup(images, targets, weights, mask)
    torch.testing.assert_close(mixed[0], torch.full((3, 2, 2), 0.7 * 0 + 0.3 * 3))
    torch.testing.assert_close(mixed[1], images[1])
    torch.testing.assert_close(mixed_targets[3], torch.tensor([0.3, 0, 0, 0.7]))


@pytest.mark.slow
def test_loader_mixup_mixes_pixels_and_targets_by_the_same_weight(tmp_path):
    from dali_relabel.loader import ReLabelLoader
    from test_loader import make_id_dataset

    image_root, store = make_id_dataset(str(tmp_path), 16)
    config = DataConfig(image_size=16, num_threads=1, mixup_alpha=1.0, seed=2)
    loader = ReLabelLoader(image_root, store, batch_size=8, config=config, device="cpu", return_rows=True)
    from test_loader import _id_colour

    for images, targets, rows in loader:
        rgb = images.mean(dim=(2, 3)) * (255 * torch.tensor(config.std)).view(1, 3) + (255 * torch.tensor(config.mean)).view(1, 3)
        for i in range(len(rows)):
            own, other = int(rows[i]), int(rows.flip(0)[i])
            lam = float(targets[i, own] / (targets[i, own] + targets[i, other]))
            expected = lam * torch.tensor(_id_colour(own), dtype=torch.float32) + \
                (1 - lam) * torch.tensor(_id_colour(other), dtype=torch.float32)
            assert torch.allclose(rgb[i], expected, atol=3), (rgb[i], expected, lam)
