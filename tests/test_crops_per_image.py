"""Several crops per decoded image (``DataConfig.crops_per_image``): every image read and decoded once
per pass, k crops cut from it, each with its own keyed window, flip, pixels and target; the loaders
flatten the batch (crops of one image adjacent), mix pairs in the flat batch, resume and shard alike."""
import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.config import BatchSizeError, DataConfig
from dali_relabel.crops import crop_key_epoch, crop_window, sample_keys
from dali_relabel.loader import flatten_crops
from dali_relabel.mixing import CutMixSpec, box_mask
from dali_relabel.sources import crop_boxes

pytest.importorskip("nvidia.dali")

SMALL = dict(image_size=16, num_threads=1, seed=7)


# -- without pipelines -------------------------------------------------------------------------------
def test_crops_per_image_is_validated_and_a_flag():
    import argparse

    from dali_relabel.config import add_arguments, from_arguments

    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match="crops_per_image"):
            DataConfig(crops_per_image=bad)
    config = DataConfig(crops_per_image=4)
    assert config.images_per_batch(8) == 2 and DataConfig().images_per_batch(7) == 7
    for bad in (6, 0):
        with pytest.raises(BatchSizeError, match=f"batch_size {bad} .*crops_per_image 4"):
            config.images_per_batch(bad)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_arguments(parser.parse_args(["--crops-per-image", "3"])).crops_per_image == 3
    assert from_arguments(parser.parse_args([])).crops_per_image == 1


def test_key_epochs_of_crops_never_collide():
    assert crop_key_epoch(5, 1, 0) == 5  # one crop: today's keys
    keys = {crop_key_epoch(epoch, 4, j) for epoch in range(6) for j in range(4)}
    assert keys == set(range(24))
    with pytest.raises(ValueError):
        crop_key_epoch(0, 2, 2)


def test_flatten_crops_keeps_the_crops_of_an_image_adjacent():
    images, k = 3, 2
    batch = {"images": torch.arange(images * k * 2 * 5).view(images, k, 2, 5).float(),
             "targets": torch.arange(images * k).view(images, k, 1).float(),
             "flip": torch.tensor([[0, 1], [1, 1], [0, 0]], dtype=torch.int32),
             "rows": torch.tensor([[7], [3], [9]]), "labels": torch.tensor([[1], [0], [2]], dtype=torch.int32),
             "valid": torch.tensor([[1], [1], [0]], dtype=torch.uint8)}
    flat = flatten_crops(batch, k)
    assert flat["images"].shape == (6, 2, 5) and torch.equal(flat["images"][3], batch["images"][1, 1])
    assert flat["targets"].reshape(-1).tolist() == list(range(6))
    assert flat["flip"].tolist() == [0, 1, 1, 1, 0, 0]
    assert flat["rows"].reshape(-1).tolist() == [7, 7, 3, 3, 9, 9]
    assert flat["labels"].reshape(-1).tolist() == [1, 1, 0, 0, 2, 2]
    assert flat["valid"].reshape(-1).tolist() == [1, 1, 1, 1, 0, 0]
    assert flatten_crops(batch, 1) is batch


@pytest.mark.parametrize("images, k", [(4, 2), (3, 4), (2, 3)])
def test_each_crop_shares_its_box_with_its_partner_in_the_flat_batch(images, k):
    spec = CutMixSpec(1.0, 1.0, 32, seed=4)
    boxes = crop_boxes(spec, 2, 5, images, k)
    assert boxes.shape == (images, k, 4)
    flat = boxes.reshape(-1, 4)
    np.testing.assert_array_equal(flat, spec.boxes(2, 5, images * k))
    for i in range(images):
        for j in range(k):  # crop j of image i pairs with crop k - 1 - j of image images - 1 - i
            np.testing.assert_array_equal(boxes[i, j], boxes[images - 1 - i, k - 1 - j])
    assert crop_boxes(spec, 2, 5, images, 1).shape == (images, 4)
    assert not crop_boxes(spec, 2, 5, images, k, mixing=False).any()


def test_a_batch_size_k_does_not_divide_is_refused(tiny_set):
    from dali_relabel.loader import ReLabelLoader

    with pytest.raises(BatchSizeError, match="batch_size 6 .*crops_per_image 4"):
        ReLabelLoader(tiny_set.images, tiny_set.store, batch_size=6, config=DataConfig(crops_per_image=4),
                      device="cpu")


# -- through the pipelines ---------------------------------------------------------------------------
def _image_sizes(tiny_set):
    sizes = []
    for relpath in tiny_set.relpaths:
        with Image.open(f"{tiny_set.images}/{relpath}") as image:
            sizes.append((image.height, image.width))
    return np.asarray(sizes)


def _crop_index(rows: torch.Tensor, k: int) -> np.ndarray:
    """Each crop's index j within its image: crops of an image are adjacent, in order."""
    rows = rows.reshape(-1, k)
    assert bool((rows == rows[:, :1]).all()), "the crops of an image are not adjacent"
    return np.tile(np.arange(k), len(rows))


def _loader(tiny_set, k, batch_size=8, store=True, **settings):
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(**{**SMALL, "crops_per_image": k, **settings})
    return ReLabelLoader(tiny_set.images, tiny_set.store if store else None, batch_size=batch_size, config=config,
                         device="cpu", return_labels=True, return_rows=True, return_geometry=True)


def _pooled(tiny_set, rows, geometry, sizes):
    """The dense reference of every crop: its own image's map pooled over its own window."""
    from dali_relabel.ops.reference import pooled_from_crops
    from dali_relabel.store import LabelStore

    with LabelStore(tiny_set.store) as store:
        maps = store.read(rows.numpy())
        layout = store.layout
    window = geometry["window"].long().numpy()
    return pooled_from_crops(torch.as_tensor(maps.logits.astype(np.float32)),
                             torch.as_tensor(maps.class_ids.astype(np.int64)), window[:, [1, 0]], window[:, [3, 2]],
                             sizes[rows.numpy()], tiny_set.num_classes, layout=layout,
                             flips=geometry["flip"].long())


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_pass_gives_k_own_crops_of_every_image_read_once(tiny_set, k):
    """Shapes and counts over a pass; every image once in the pipeline (the plan's rows, each k
    times in a row); every crop's window and flip the twin's with key epoch ``epoch * k + j``; every
    crop's target its own map pooled over its own window."""
    loader = _loader(tiny_set, k)
    sizes = _image_sizes(tiny_set)
    config = loader.config
    assert len(loader) == 24 // (8 // k) and loader.batch_size == 8 and len(loader.dataset) == 24
    assert len(loader.sampler) == 24 * k
    epoch = 1
    loader.set_epoch(epoch)
    expected_rows = list(loader.sampler)
    plan_rows, _ = loader.plan.rows(epoch)
    assert expected_rows == np.repeat(plan_rows, k).tolist() and sorted(plan_rows.tolist()) == list(range(24))
    seen, batches = [], 0
    for images, targets, labels, rows, geometry in loader:
        batches += 1
        assert images.shape == (8, 3, 16, 16) and targets.shape == (8, tiny_set.num_classes)
        assert labels.shape == rows.shape == (8,) and geometry["window"].shape == (8, 4)
        assert geometry["flip"].shape == (8,) and geometry["affine"].shape == (8, 2, 3)
        j = _crop_index(rows, k)
        for row, index, window, flip in zip(rows.tolist(), j, geometry["window"].tolist(), geometry["flip"].tolist()):
            key = int(sample_keys(config.seed, crop_key_epoch(epoch, k, int(index)), [row])[0])
            y, x, h, w, mirror = crop_window(*sizes[row], key, config.scale, config.ratio, config.num_attempts,
                                             config.flip_probability)
            assert window == [x, y, w, h] and flip == mirror, (row, index)
        torch.testing.assert_close(targets, _pooled(tiny_set, rows, geometry, sizes), rtol=1e-5, atol=1e-6)
        seen += rows.tolist()
    assert batches == len(loader) and seen == expected_rows  # each image read once, its k crops adjacent
    if k > 1:  # the crops of an image differ
        assert len({tuple(w) for w in geometry["window"].tolist()}) > len(geometry["window"]) // 2


def _reference_images(tiny_set, rows, geometry, config, in_place=False):
    """Each crop's window decoded with ``decoders.image_slice``, resized and normalised as the graph
    does (today's one-crop path); ``in_place``: the whole image decoded and the window resized from it
    (the several-crops path)."""
    from nvidia.dali import fn, pipeline_def

    from dali_relabel.pipelines.graphs import decoder_args, normalize, resize_square

    window = geometry["window"].numpy()
    data = [np.fromfile(f"{tiny_set.images}/{tiny_set.relpaths[r]}", np.uint8) for r in rows.tolist()]
    anchors = [np.array([w[1], w[0]], np.int32) for w in window]
    shapes = [np.array([w[3], w[2]], np.int32) for w in window]
    mirrors = [np.array(int(f), np.int32) for f in geometry["flip"].tolist()]

    @pipeline_def(batch_size=len(data), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def graph():
        jpegs, anchor, shape, mirror = fn.external_source(lambda: (data, anchors, shapes, mirrors), num_outputs=4,
                                                          batch=True)
        if in_place:
            images = fn.decoders.image(jpegs, **decoder_args("cpu", config))
            return normalize(resize_square(images, config, window=(anchor, shape)), config, mirror)
        images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", **decoder_args("cpu", config))
        return normalize(resize_square(images, config), config, mirror)

    pipe = graph()
    pipe.build()
    (images,) = pipe.run()
    return torch.from_numpy(np.stack([np.array(t) for t in images]))


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_every_crop_shows_its_own_window(tiny_set, k):
    """One crop: today's ROI decode, bit for bit. Several: each window resized in place from the
    whole decode, bit for bit; inside a 2-pixel border it also shows what cutting the window first
    shows, within the few levels by which libjpeg's ROI decoding differs (at the border the resize
    filter also reads the pixels just outside the window)."""
    loader = _loader(tiny_set, k, image_size=24)
    images, _, _, rows, geometry = next(iter(loader))
    expected = _reference_images(tiny_set, rows, geometry, loader.config)
    if k == 1:
        assert torch.equal(images, expected)
    else:
        assert torch.equal(images, _reference_images(tiny_set, rows, geometry, loader.config, in_place=True))
        inside = (..., slice(2, -2), slice(2, -2))
        torch.testing.assert_close(images[inside], expected[inside], rtol=0, atol=3 / 255 / min(loader.config.std))
        assert not torch.equal(images[0], images[1])  # two crops of one image


@pytest.mark.slow
def test_hard_label_targets_come_per_crop(tiny_set):
    loader = _loader(tiny_set, 2, store=False)
    count = 0
    for _, targets, labels, rows, _ in loader:
        _crop_index(rows, 2)
        assert torch.equal(targets, torch.nn.functional.one_hot(labels, targets.shape[1]).float())
        count += len(rows)
    assert count == 48


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["authors", "localized", "mixup"])
def test_mixing_pairs_crops_in_the_flat_batch(tiny_set, mode):
    """Crop j of image i mixes with crop k - 1 - j of image B / k - 1 - i, each crop with its own box
    (localized: the partner's map pooled over exactly that box of the partner's own crop)."""
    from dali_relabel.mixing import mixup_weights
    from dali_relabel.ops.reference import reference_region_pooling
    from dali_relabel.store import LabelStore

    k, size = 2, 8
    settings = dict(mixup_alpha=1.0) if mode == "mixup" else dict(cutmix_probability=1.0, cutmix_mode=mode)
    loader = _loader(tiny_set, k, batch_size=size, **settings)
    config = loader.config
    sizes = _image_sizes(tiny_set)
    store = LabelStore(tiny_set.store)
    for index, (images, targets, _, rows, geometry) in enumerate(loader):
        _crop_index(rows, k)
        whole = _pooled(tiny_set, rows, geometry, sizes)
        if mode == "mixup":
            lam = mixup_weights(size, config.mixup_alpha, config.seed, 0, index).view(-1, 1)
            torch.testing.assert_close(targets, lam * whole + (1 - lam) * whole.flip(0), rtol=1e-5, atol=1e-6)
            continue
        spec = CutMixSpec(1.0, config.cutmix_alpha, config.image_size, seed=config.seed)
        boxes = torch.from_numpy(crop_boxes(spec, 0, index, size // k, k).reshape(size, 4))
        lam = (1.0 - box_mask(boxes, 16, 16).flatten(1).float().mean(1)).view(-1, 1)
        if mode == "authors":
            expected = lam * whole + (1 - lam) * whole.flip(0)
        else:
            maps = store.read(rows.numpy())
            window = geometry["window"].long().numpy()
            data = (torch.as_tensor(maps.logits.astype(np.float32)), torch.as_tensor(maps.class_ids.astype(np.int64)),
                    window[:, [1, 0]], window[:, [3, 2]], sizes[rows.numpy()])
            common = dict(flips=geometry["flip"].numpy(), layout=store.layout)
            rest = reference_region_pooling(*data, boxes.numpy(), tiny_set.num_classes, mode="outside", **common)
            box = reference_region_pooling(*data, boxes.numpy(), tiny_set.num_classes, mode="inside", **common)
            expected = lam * rest + (1 - lam) * box.flip(0)
        torch.testing.assert_close(targets, expected, rtol=1e-4, atol=1e-5)
    store.close()


@pytest.mark.slow
def test_ranks_split_the_images(tiny_set):
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(**SMALL, crops_per_image=2, last_batch="pad")
    seen = []
    for rank in range(2):
        loader = ReLabelLoader(tiny_set.images, tiny_set.store, batch_size=6, config=config, device="cpu", rank=rank,
                               world_size=2, return_rows=True)
        assert len(loader) == 4 and len(loader.sampler) == 24  # 12 images per rank, 3 a batch
        rows = torch.cat([r for _, _, r in loader])
        _crop_index(rows, 2)
        seen.append(set(rows.tolist()))
        assert len(rows) == 24
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


@pytest.mark.slow
def test_a_resumed_epoch_continues_with_the_same_crops(tiny_set):
    full = [(rows, targets) for _, targets, _, rows, _ in _loader(tiny_set, 2)]
    first = _loader(tiny_set, 2)
    taken = iter(first)
    for _ in range(2):
        next(taken)
    state = first.state_dict()
    assert state["batch"] == 2 and state["batch_size"] == 8 and state["position"] == 8  # 2 batches of 4 images
    assert state["data"]["crops_per_image"] == 2
    resumed = _loader(tiny_set, 2)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - 2
    rest = [(rows, targets) for _, targets, _, rows, _ in resumed]
    assert len(rest) == len(full) - 2
    for (rows, targets), (want_rows, want_targets) in zip(rest, full[2:]):
        assert torch.equal(rows, want_rows) and torch.equal(targets, want_targets)
    from dali_relabel.loader_state import ResumeError

    with pytest.raises(ResumeError, match="crops_per_image"):
        _loader(tiny_set, 4).load_state_dict(state)


@pytest.mark.slow
def test_shards_give_the_tree_loaders_crops(tiny_set, tmp_path):
    """The shard loader with k crops per image: the same k crops (pixels, windows, targets) of every
    row as the tree loader, each image read once per pass."""
    from dali_relabel.shard_loader import ShardReLabelLoader
    from dali_relabel.shards import write_shards

    shards = write_shards(tiny_set.images, tiny_set.store, tmp_path / "shards", shard_bytes=20_000, progress=False)
    config = DataConfig(**SMALL, crops_per_image=2)
    with pytest.raises(BatchSizeError, match="batch_size 5"):
        ShardReLabelLoader(shards, 5, config=config, device="cpu")

    def by_crop(batches):
        found = {}
        for images, targets, rows, geometry in batches:
            for position, (row, j) in enumerate(zip(rows.tolist(), _crop_index(rows, 2))):
                assert (row, j) not in found, "an image was read twice in a pass"
                found[row, j] = (images[position], targets[position], geometry["window"][position])
        return found

    loader = ShardReLabelLoader(shards, 8, config=config, device="cpu", return_rows=True, return_geometry=True)
    assert len(loader) == 6 and loader.batch_size == 8 and len(loader.sampler) == 48
    from_shards = by_crop(loader)
    tree = _loader(tiny_set, 2)
    from_tree = by_crop((i, t, r, g) for i, t, _, r, g in tree)
    assert len(from_shards) == len(from_tree) == 48
    for key, (image, target, window) in from_tree.items():
        other = from_shards[key]
        assert torch.equal(window, other[2]) and torch.equal(image, other[0]) and torch.equal(target, other[1]), key


@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_crops_match_the_cpu_crops(tiny_set):
    """The mixed decoder, ``fn.slice`` on the GPU and the CUDA pooling give every crop the CPU path's
    window and target (pixels as close as two JPEG decoders get), localized CutMix included."""
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(**SMALL, crops_per_image=2, cutmix_probability=1.0, cutmix_mode="localized")
    results = {}
    for device in ("cpu", "cuda"):
        loader = ReLabelLoader(tiny_set.images, tiny_set.store, batch_size=8, config=config, device=device,
                               return_rows=True, return_geometry=True)
        results[device] = [(i.cpu(), t.cpu(), r.cpu(), {k: v.cpu() for k, v in g.items()}) for i, t, r, g in loader]
    assert len(results["cpu"]) == len(results["cuda"]) == 6
    for (images, targets, rows, geometry), (g_images, g_targets, g_rows, g_geometry) in zip(results["cpu"],
                                                                                          results["cuda"]):
        assert torch.equal(rows, g_rows) and torch.equal(geometry["window"], g_geometry["window"])
        assert torch.equal(geometry["flip"], g_geometry["flip"])
        torch.testing.assert_close(g_targets, targets, rtol=1e-4, atol=1e-5)
        assert float((g_images - images).abs().mean()) < 0.05  # decoders differ in a few levels, not crops
