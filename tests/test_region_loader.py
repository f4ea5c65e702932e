"""Training from a region store (FKD's stored crops): the source chooses each sample's stored crops
keyed, the graph cuts exactly those windows and flips them as stored, the targets are the stored soft
labels made dense. The exactness tests use id-encoded images (a pixel's red and green values tell its
position, blue its image) and labels unique per (row, crop), so every yielded crop is traced back to
the stored crop it was cut from, through its geometry and through its pixels."""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import pytest
import torch

from dali_relabel.config import DataConfig
from dali_relabel.crops import SplitMix64
from dali_relabel.store import (REGION_STREAM, RegionStore, StoreError, dense_targets, pixel_windows,
                                write_region_store)

pytest.importorskip("nvidia.dali")

FOLDERS, PER_FOLDER, CLASSES, REGIONS, TOP_K = 4, 3, 6, 4, 3
SEED = 3
X_STEP, Y_STEP, ROW_STEP = 4, 4, 20  # red = 4 x, green = 4 y, blue = 20 row


@dataclass(frozen=True)
class RegionSet:
    images: str
    store: str
    relpaths: Tuple[str, ...]
    sizes: np.ndarray  #: [N, 2] (height, width)
    boxes: np.ndarray  #: [N, R, 4] float (x0, y0, w, h)
    flips: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    labels: np.ndarray


def _boxes(rng, height: int, width: int) -> np.ndarray:
    """R float boxes (at least 10 px a side) whose whole-pixel windows' centres lie 3 px or more apart
    on some axis, so a crop's pixels tell which one it shows."""
    while True:
        w, h = rng.uniform(10, 0.8 * width, REGIONS), rng.uniform(10, 0.8 * height, REGIONS)
        x0, y0 = rng.uniform(0, 1, REGIONS) * (width - w), rng.uniform(0, 1, REGIONS) * (height - h)
        boxes = np.stack([x0, y0, w, h], -1).astype(np.float32)
        centres = _centres(pixel_windows(boxes[None], np.array([[height, width]]))[0])
        gaps = np.abs(centres[:, None] - centres[None]).max(-1) + np.eye(REGIONS) * 99
        if gaps.min() >= 3:
            return boxes


def _centres(windows: np.ndarray) -> np.ndarray:
    """``[..., 2]`` (x, y) pixel-index centres of ``(y0, x0, h, w)`` windows."""
    windows = windows.astype(np.float64)
    return np.stack([windows[..., 1] + (windows[..., 3] - 1) / 2, windows[..., 0] + (windows[..., 2] - 1) / 2], -1)


def make_region_set(root) -> RegionSet:
    """12 id-encoded PNGs (lossless) in 4 class folders and a region store of 4 crops each over 6
    classes, every crop's top-3 label unique (its first probability encodes (row, crop))."""
    from PIL import Image

    rng = np.random.default_rng(11)
    images = os.path.join(root, "images")
    relpaths, sizes = [], []
    for folder in range(FOLDERS):
        os.makedirs(os.path.join(images, f"class_{folder:02d}"), exist_ok=True)
        for i in range(PER_FOLDER):
            relpaths.append(f"class_{folder:02d}/img_{i}.png")
            sizes.append((int(rng.integers(40, 61)), int(rng.integers(48, 64))))
    for row, (relpath, (height, width)) in enumerate(zip(relpaths, sizes)):
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([X_STEP * x, Y_STEP * y, np.full_like(x, ROW_STEP * row)], -1).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(os.path.join(images, relpath))
    sizes = np.asarray(sizes, np.int32)
    n = len(relpaths)
    boxes = np.stack([_boxes(rng, h, w) for h, w in sizes])
    flips = rng.integers(0, 2, (n, REGIONS)).astype(np.uint8)
    ids = np.argsort(rng.random((n, REGIONS, CLASSES)), -1)[..., :TOP_K]
    first = 0.5 + 0.004 * np.arange(n * REGIONS).reshape(n, REGIONS)
    values = np.stack([first, np.full_like(first, 0.1), np.full_like(first, 0.05)], -1).astype(np.float32)
    labels = np.array([int(p[6:8]) for p in relpaths])
    store = write_region_store(os.path.join(root, "regions.h5"), relpaths, boxes, flips, ids, values, sizes,
                               CLASSES, labels=labels, class_names=[f"class_{c:02d}" for c in range(CLASSES)],
                               values_dtype=np.float32)
    return RegionSet(images, store, tuple(relpaths), sizes, boxes, flips, ids, values, labels)


@pytest.fixture(scope="module")
def region_set(tmp_path_factory):
    return make_region_set(str(tmp_path_factory.mktemp("regions")))


def _twin_select(seed: int, epoch: int, row: int, count: int, regions: int) -> list:
    """The stored-crop choice in Python integers (SplitMix64 steps, one uniform per stored crop, the
    ``count`` smallest): independent of the numpy code the source uses."""
    mix = lambda x: SplitMix64(x).next()  # noqa: E731
    mask = (1 << 64) - 1
    key = mix((mix((mix(seed) + epoch) & mask) + row) & mask)
    base = mix(0xA0761D6478BD642F ^ REGION_STREAM)
    uniforms = [(mix(key ^ mix((base + j) & mask)) >> 11) * 2.0 ** -53 for j in range(regions)]
    return [j for _, j in sorted((u, j) for j, u in enumerate(uniforms))][:count]


# -- without pipelines -------------------------------------------------------------------------------
def test_pixel_windows_round_each_corner_as_pil_crops():
    boxes = np.array([[[2.5, 3.5, 1.0, 2.0],      # corners 2.5 -> 2, 3.5 -> 4 (halves to even)
                       [0.4, 0.6, 0.3, 0.2],      # under a pixel: kept one pixel wide
                       [10.2, 5.0, 9.805, 15.004],  # ends 0.004 px past the 20 x 20 image: clipped
                       [19.7, 19.6, 0.3, 0.4]]],  # at the far corner: one pixel, inside
                     np.float32)
    windows = pixel_windows(boxes, np.array([[20, 20]]))
    assert windows.dtype == np.int32 and windows.shape == (1, 4, 4)
    assert windows[0].tolist() == [[4, 2, 2, 2], [1, 0, 1, 1], [5, 10, 15, 10], [19, 19, 1, 1]]
    rng = np.random.default_rng(0)  # inside the image: PIL's round of every corner (Python's round)
    sizes = rng.integers(20, 90, (50, 2))
    x0, y0 = rng.uniform(0, 0.5, (50, 6)) * sizes[:, 1:], rng.uniform(0, 0.5, (50, 6)) * sizes[:, :1]
    w, h = rng.uniform(0.05, 0.5, (50, 6)) * sizes[:, 1:], rng.uniform(0.05, 0.5, (50, 6)) * sizes[:, :1]
    boxes = np.stack([x0, y0, w, h], -1).astype(np.float32)
    windows = pixel_windows(boxes, sizes)
    for (bx, by, bw, bh), (wy, wx, wh, ww) in zip(boxes.reshape(-1, 4).astype(np.float64), windows.reshape(-1, 4)):
        assert (wx, wy, wx + ww, wy + wh) == (round(bx), round(by), round(bx + bw), round(by + bh))


def _source(region_set, repeats=1, epochs=True, crops=2):
    from dali_relabel.plan import EpochPlan
    from dali_relabel.sources import BatchSource, EpochControl

    plan = EpochPlan(len(region_set.relpaths), 4, seed=SEED, repeats=repeats)
    control = EpochControl()
    control.begin(0, 2, 0, plan.num_batches)
    return BatchSource(region_set.images, plan, control, store_path=region_set.store, epochs=epochs,
                       crops_per_image=crops, regions=True, seed=SEED)


class _Info:
    def __init__(self, iteration, epoch_idx=0):
        self.iteration, self.epoch_idx = iteration, epoch_idx


@pytest.mark.parametrize("repeats", [1, 3])
def test_the_source_hands_over_each_samples_keyed_stored_crops(region_set, repeats):
    """Fields as declared; each sample's crops are ``select(seed, its key epoch, row, k)`` (with
    repeated augmentation the copy's key epoch), their whole-pixel windows, flips and labels."""
    from dali_relabel import fields

    source = _source(region_set, repeats)
    assert [f.name for f in source.fields] == ["paths", "region_window", "region_flip", "region_ids",
                                               "region_values", "labels", "rows", "valid", "epochs"]
    for iteration in range(source.plan.num_batches):
        out = dict(zip(source.names, source(_Info(iteration))))
        for field in source.fields:
            assert out[field.name].ndim - 1 == field.ndim and out[field.name].dtype == np.dtype(field.dtype), field
        rows, keys = out["rows"][:, 0], out["epochs"]
        if repeats == 1:
            assert (keys == 2).all()
        for i, (row, key) in enumerate(zip(rows.tolist(), keys.tolist())):
            crops = _twin_select(SEED, key, row, 2, REGIONS)
            np.testing.assert_array_equal(out["region_window"][i],
                                          pixel_windows(region_set.boxes[row, crops][None], region_set.sizes[[row]])[0])
            assert out["region_flip"][i].tolist() == region_set.flips[row, crops].tolist()
            assert out["region_ids"][i].tolist() == region_set.ids[row, crops].tolist()
            np.testing.assert_array_equal(out["region_values"][i], region_set.values[row, crops])
    without = _source(region_set, epochs=False)  # nothing keyed after the cut: no epochs handed over
    assert "epochs" not in without.names
    np.testing.assert_array_equal(dict(zip(without.names, without(_Info(0))))["region_window"],
                                  dict(zip(source.names, _source(region_set)(_Info(0))))["region_window"])


def _loader(region_set, batch_size=4, **settings):
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(**{"image_size": 16, "num_threads": 1, "seed": SEED, **settings})
    return ReLabelLoader(region_set.images, region_set.store, batch_size=batch_size, config=config, device="cpu",
                         return_labels=True, return_rows=True, return_geometry=True)


@pytest.mark.parametrize("settings, message", [
    (dict(crops_per_image=5), r"crops_per_image 5 asks for 5 distinct stored crops per image, but region store "
                              r".*regions.h5 holds 4 per image"),
    (dict(cutmix_probability=0.5, cutmix_mode="localized"), r'cutmix_mode "localized" \(it pools'),
    (dict(auto_augment="rand-m9-mstd0.5-inc1"), r"auto_augment 'rand-m9-mstd0.5-inc1' has geometric ops \(.*Rotate"),
    (dict(auto_augment="ta_wide"), r"auto_augment 'ta_wide' has geometric ops"),
    (dict(vflip_probability=0.5), r"vflip_probability 0.5"),
    (dict(output_size=(2, 2)), r"output_size \(2, 2\)"),
    (dict(temperature=2.0), r"temperature 2.0"),
    (dict(adjust_orientation=True), r"adjust_orientation True"),
])
def test_settings_a_stored_crop_label_cannot_follow_are_refused(region_set, settings, message):
    from dali_relabel.regions import RegionSettingsError

    batch_size = 10 if settings.get("crops_per_image") == 5 else 4
    with pytest.raises(RegionSettingsError, match=message):
        _loader(region_set, batch_size, **settings)


def _rewrite(region_set, path, relpaths=None, sizes=None, labels=None, rows=None):
    rows = slice(None) if rows is None else rows
    return write_region_store(path, list(relpaths or region_set.relpaths)[rows], region_set.boxes[rows],
                              region_set.flips[rows], region_set.ids[rows], region_set.values[rows],
                              (region_set.sizes if sizes is None else sizes)[rows], CLASSES,
                              labels=(region_set.labels if labels is None else labels)[rows],
                              class_names=[f"class_{c:02d}" for c in range(CLASSES)])


def test_a_store_that_does_not_describe_the_tree_is_refused_at_open(region_set, tmp_path):
    from dali_relabel.loader import ReLabelLoader

    def opening(store, **config):
        return ReLabelLoader(region_set.images, store, batch_size=4, config=DataConfig(image_size=16, **config),
                             device="cpu")

    moved = list(region_set.relpaths)
    moved[5] = moved[5].replace("img_2", "img_9")
    with pytest.raises(StoreError, match=r"row 5 refers to class_01/img_9.png, which is not under"):
        opening(_rewrite(region_set, tmp_path / "paths.h5", relpaths=moved))
    with pytest.raises(StoreError, match=r"1 images under .* have no map, first: class_03/img_2.png"):
        opening(_rewrite(region_set, tmp_path / "fewer.h5", rows=slice(0, 11)))
    sizes = region_set.sizes.copy()
    sizes[:, 0] += 1  # every box still inside its (wrong) size
    with pytest.raises(StoreError, match=r"stored image size .* but the file is"):
        opening(_rewrite(region_set, tmp_path / "sizes.h5", sizes=sizes))
    labels = region_set.labels.copy()
    labels[0] = 5
    with pytest.raises(StoreError, match=r"row 0 \(class_00/img_0.png\) has label 5 = 'class_05', but lies in"):
        opening(_rewrite(region_set, tmp_path / "labels.h5", labels=labels))
    with pytest.raises(ValueError, match=r"num_classes 4 .* is smaller than the .*6"):
        opening(region_set.store, num_classes=4)


def test_region_targets_are_the_dense_stored_labels_padded_as_maps_are(region_set):
    from dali_relabel.loader import mix_batch
    from dali_relabel.regions import region_targets

    ids = torch.as_tensor(region_set.ids[:3, 0].astype(np.int32))
    values = torch.as_tensor(region_set.values[:3, 0])
    batch = region_targets({"region_ids": ids, "region_values": values, "rows": torch.zeros(3, 1)}, CLASSES,
                           "marginal_smoothing")
    assert set(batch) == {"targets", "rows"}
    expected = dense_targets(ids, values, CLASSES, "marginal_smoothing")
    torch.testing.assert_close(batch["targets"], expected)
    torch.testing.assert_close(batch["targets"].sum(1), torch.ones(3))
    padded = mix_batch(dict(batch, images=torch.zeros(3, 3, 2, 2)), DataConfig(num_classes=9), 0, 0)["targets"]
    assert padded.shape == (3, 9) and torch.equal(padded[:, :CLASSES], expected) and not padded[:, CLASSES:].any()


def test_a_region_store_given_for_shards_is_named(region_set):
    from dali_relabel.shard_checks import ShardError
    from dali_relabel.shards import ShardSet

    with pytest.raises(ShardError, match=r"regions.h5 is a region store, not tar shards: pack it with "
                                         r"`dali-relabel shard`, or train from the image tree"):
        ShardSet.load(region_set.store)


@pytest.fixture(scope="module")
def region_shards(region_set, tmp_path_factory):
    from dali_relabel.shards import write_shards

    return write_shards(region_set.images, region_set.store, str(tmp_path_factory.mktemp("region-shards")),
                        shard_bytes=20_000, progress=False, workers=1)


@pytest.mark.slow
def test_region_shards_hold_every_stored_crop_of_every_row_exactly(region_set, region_shards):
    import tarfile

    from dali_relabel import fields
    from dali_relabel.shards import ShardSet

    shards = ShardSet.load(region_shards.directory, verify="full")
    assert shards.kind == "regions" and shards.has_regions and not shards.has_maps
    assert (shards.regions, shards.k, shards.label_type, shards.values_dtype) == \
        (REGIONS, TOP_K, "marginal_smoothing", "float32")
    assert len(shards.shards) > 1 and shards.num_samples == len(region_set.relpaths)
    assert shards.extensions == ["jpg", "boxes", "flips", "rids", "values", "label", "row"]
    store = RegionStore(region_set.store)
    assert shards.store_sha256 == store.header.content_sha256
    seen = []
    for entry in shards.shards:
        with tarfile.open(shards.path(entry["name"])) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".", 1)[0] for name in members})
        assert len(keys) == entry["samples"]
        for key in keys:
            def member(field):
                return np.frombuffer(members[f"{key}.{field.tar_ext}"], shards.dtype(field))

            row = int(member(fields.ROWS)[0])
            seen.append(row)
            np.testing.assert_array_equal(member(fields.STORED_BOXES).reshape(REGIONS, 4), region_set.boxes[row])
            np.testing.assert_array_equal(member(fields.STORED_FLIPS), region_set.flips[row])
            np.testing.assert_array_equal(member(fields.STORED_IDS).reshape(REGIONS, TOP_K), region_set.ids[row])
            np.testing.assert_array_equal(member(fields.STORED_VALUES).reshape(REGIONS, TOP_K),
                                          region_set.values[row])
            assert member(fields.STORED_IDS).dtype == store.class_ids_dtype
            assert int(member(fields.LABELS)[0]) == region_set.labels[row]
            assert members[f"{key}.jpg"] == open(os.path.join(region_set.images, region_set.relpaths[row]),
                                                 "rb").read()
    assert sorted(seen) == list(range(len(region_set.relpaths)))


@pytest.mark.slow
def test_region_shard_members_of_the_wrong_size_are_refused(region_shards, tmp_path):
    import shutil

    from dali_relabel.shard_checks import ShardError
    from dali_relabel.shards import ShardSet

    copy = tmp_path / "copy"
    shutil.copytree(region_shards.directory, copy)
    name = region_shards.shards[0]["name"]
    idx = copy / (name[:-4] + ".idx")
    lines = idx.read_text().split("\n")
    tokens = lines[1].split()
    at = tokens.index("values") + 2  # ext offset size name: the values member's size
    tokens[at] = str(int(tokens[at]) // 2)  # float16 values' size where float32 were written
    lines[1] = " ".join(tokens)
    idx.write_text("\n".join(lines))
    shards = ShardSet.load(str(copy), check_sizes=False)
    with pytest.raises(ShardError, match=r"member \S+\.values .* has the wrong size for its kind \(expected "
                                         rf"{4 * REGIONS * TOP_K} bytes\)"):
        shards.check_index_files([name])


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    ({"values_dtype": "float64"}, r"field 'values_dtype' must be one of \('float16', 'float32'\)"),
    ({"regions": 0}, r"field 'regions' must be a positive integer"),
    ({"label_type": "soft"}, r"need 1 <= k <= num_classes, ids_dtype and a label_type of"),
    ({"kind": "maps"}, r"shards with maps need k, grid and ids_dtype"),
    ({"kind": ["regions"]}, r"field 'kind' must be one of \['images', 'maps', 'regions'\]"),
])
def test_an_index_of_region_shards_with_a_bad_field_is_refused(region_shards, tmp_path, edit, message):
    import shutil

    from dali_relabel.shard_checks import ShardError, index_digest
    from dali_relabel.shards import ShardSet

    copy = tmp_path / "copy"
    shutil.copytree(region_shards.directory, copy)
    index = json.loads((copy / "index.json").read_text())
    index.update(edit)
    index["index_sha256"] = index_digest(index)  # a consistent index that says something wrong
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=message):
        ShardSet.load(str(copy))


@pytest.mark.slow
def test_region_shards_validate_and_the_shard_trainer_refuses_what_the_tree_loader_refuses(region_set, region_shards):
    from dali_relabel.regions import RegionSettingsError
    from dali_relabel.shard_loader import ShardReLabelLoader, ShardValidationLoader

    with pytest.raises(RegionSettingsError, match=r"the region store's shards in .* cannot be trained with "
                                                  r"vflip_probability 0.5"):
        ShardReLabelLoader(region_shards, 4, DataConfig(image_size=16, num_threads=1, vflip_probability=0.5),
                           device="cpu")
    with pytest.raises(RegionSettingsError, match=r"crops_per_image 5 asks for 5 distinct stored crops per image, "
                                                  r"but the region store's shards in .* hold"):
        ShardReLabelLoader(region_shards, 10, DataConfig(image_size=16, num_threads=1, crops_per_image=5),
                           device="cpu")
    rows = []
    for batch in ShardValidationLoader(region_shards, 4, DataConfig(image_size=16, num_threads=1),
                                       device="cpu", return_rows=True):
        rows.extend(batch[-1].tolist())
    assert sorted(rows) == list(range(len(region_set.relpaths)))


@pytest.mark.slow
def test_the_select_regions_operator_chooses_and_rounds_as_the_python_twin():
    """``relabel.select_regions`` on random stores (R 1-9, random float32 boxes, some past the
    image, halves to round) against :func:`select_regions` and :func:`pixel_windows`: the same crops
    in the same order, windows, flips and labels."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_relabel.ops.plugin import load_plugin
    from dali_relabel.store import select_regions

    load_plugin()
    rng = np.random.default_rng(5)
    n, seed, top = 24, 77, 3
    for count, regions in [(1, 1), (2, 5), (3, 9)]:
        sizes = rng.integers(1, 80, (n, 2))
        boxes = np.stack([rng.uniform(-5, 1.1, (n, regions)) * sizes[:, 1:], rng.uniform(-5, 1.1, (n, regions)) * sizes[:, :1],
                          rng.uniform(0, 1.2, (n, regions)) * sizes[:, 1:], rng.uniform(0, 1.2, (n, regions)) * sizes[:, :1]],
                         -1).astype(np.float32)
        boxes[:, :, :2] = np.where(rng.random((n, regions, 2)) < 0.3, np.floor(boxes[:, :, :2]) + 0.5, boxes[:, :, :2])
        flips = rng.integers(0, 2, (n, regions)).astype(np.uint8)
        ids = rng.integers(0, 1000, (n, regions, top)).astype(np.uint16)
        values = rng.random((n, regions, top)).astype(np.float16)
        rows = rng.integers(0, 10**6, n).astype(np.int64)
        epochs = rng.integers(0, 300, n).astype(np.int64)
        shapes = np.concatenate([sizes, np.full((n, 1), 3)], 1).astype(np.int64)

        @pipeline_def(batch_size=n, num_threads=1, device_id=None)
        def graph():
            inputs = [fn.external_source(source=(lambda b: lambda: b)(list(a)), batch=True) for a in
                      (boxes.reshape(n, -1), flips, ids.reshape(n, -1), values.reshape(n, -1), shapes,
                       rows[:, None], epochs[:, None])]
            return tuple(fn.relabel.select_regions(inputs[0], inputs[1], fn.cast(inputs[2], dtype=types.INT32),
                                                   fn.cast(inputs[3], dtype=types.FLOAT), *inputs[4:], seed=seed,
                                                   count=count))

        pipe = graph()
        pipe.build()
        windows, mirrors, out_ids, out_values, indices = (np.stack([np.array(t) for t in out]) for out in pipe.run())
        chosen = np.stack([select_regions(seed, int(e), [int(r)], count, regions)[0] for r, e in zip(rows, epochs)])
        np.testing.assert_array_equal(indices, chosen)
        picked = np.take_along_axis(boxes, chosen[..., None], 1)
        np.testing.assert_array_equal(windows, pixel_windows(picked, sizes))
        np.testing.assert_array_equal(mirrors, np.take_along_axis(flips, chosen, 1))
        np.testing.assert_array_equal(out_ids, np.take_along_axis(ids, chosen[..., None], 1).astype(np.int32))
        np.testing.assert_array_equal(out_values, np.take_along_axis(values, chosen[..., None], 1).astype(np.float32))
        assert windows.dtype == np.int32 and out_values.dtype == np.float32 and indices.dtype == np.int64


def _crop_set(batches) -> list:
    """Sorted ``(row, window, flip, target)`` of every yielded crop (targets rounded to 1e-6)."""
    crops = []
    for _, targets, _, rows, geometry in batches:
        for i, row in enumerate(rows.tolist()):
            crops.append((row, tuple(geometry["window"][i].tolist()), int(geometry["flip"][i]),
                          tuple(np.round(targets[i].numpy().astype(np.float64), 6).tolist())))
    return sorted(crops)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_the_shard_loader_cuts_and_labels_the_stored_crops_the_tree_loader_does(region_set, region_shards, k):
    """For the same seed and epoch the shard loader yields the same crops as the tree loader over a
    pass (in another order): each row's chosen stored crops, their windows, flips and dense targets."""
    from dali_relabel.shard_loader import ShardReLabelLoader

    tree = _loader(region_set, crops_per_image=k)
    config = tree.config
    shards = ShardReLabelLoader(region_shards, 4, config, device="cpu", return_labels=True, return_rows=True,
                                return_geometry=True)
    for epoch in (0, 3):
        tree.set_epoch(epoch)
        shards.set_epoch(epoch)
        expected, got = _crop_set(tree), _crop_set(shards)
        assert len(got) == len(region_set.relpaths) * k
        assert got == expected, epoch


# -- through the pipelines ---------------------------------------------------------------------------
def _pixels(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """The loader's normalised images back in 0-255 units, ``[B, 3, S, S]`` float64."""
    mean = torch.tensor(config.mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(config.std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return images.double() * std + mean


def _crop_positions(rows: torch.Tensor, k: int) -> list:
    rows = rows.reshape(-1, k)
    assert bool((rows == rows[:, :1]).all()), "the crops of an image are not adjacent"
    return list(range(k)) * len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_every_crop_is_cut_from_its_stored_box_and_gets_its_stored_label(region_set, k):
    """A full pass at epoch 1: every image once with its k crops; each crop is the stored crop the
    Python twin of ``select`` chose (in its order): its window is the stored box rounded, its flip the
    stored flip, its target that crop's stored label made dense (unique per row and crop), and its
    pixels show that window of that image, mirrored as stored."""
    loader = _loader(region_set, crops_per_image=k)
    config = loader.config
    epoch = 1
    loader.set_epoch(epoch)
    with RegionStore(region_set.store) as store:
        label_type = store.label_type
    all_targets = dense_targets(region_set.ids, region_set.values, CLASSES, label_type).reshape(-1, CLASSES)
    assert torch.cdist(all_targets, all_targets).add(torch.eye(len(all_targets))).min() > 1e-3  # unique labels
    windows = pixel_windows(region_set.boxes, region_set.sizes)
    seen = []
    for images, targets, labels, rows, geometry in loader:
        assert images.shape == (4, 3, 16, 16) and targets.shape == (4, CLASSES)
        pixels = _pixels(images, config)
        for i, (row, position) in enumerate(zip(rows.tolist(), _crop_positions(rows, k))):
            crop = _twin_select(SEED, epoch, row, k, REGIONS)[position]
            y0, x0, h, w = windows[row, crop].tolist()
            assert geometry["window"][i].tolist() == [x0, y0, w, h], (row, crop)
            assert int(geometry["flip"][i]) == int(region_set.flips[row, crop])
            assert torch.equal(geometry["affine"][i], torch.tensor([[1., 0, 0], [0, 1, 0]]))
            torch.testing.assert_close(targets[i], all_targets[row * REGIONS + crop], rtol=0, atol=1e-6)
            assert int(labels[i]) == int(region_set.labels[row])
            # the pixels: blue tells the image, the mean red and green the window's centre, the
            # direction of the red ramp the flip
            red, green, blue = pixels[i]
            assert abs(float(blue.mean()) - ROW_STEP * row) < 1.5
            seen_centre = np.array([float(red.mean()) / X_STEP, float(green.mean()) / Y_STEP])
            distances = np.abs(_centres(windows[row]) - seen_centre).max(-1)
            assert int(distances.argmin()) == crop and distances[crop] < 1.0, (row, crop, distances)
            ramp = float(red[:, -4:].mean() - red[:, :4].mean())
            assert (ramp < 0) == bool(region_set.flips[row, crop]), (row, crop, ramp)
        seen += rows.tolist()
    assert sorted(seen) == sorted(list(range(len(region_set.relpaths))) * k)  # each image once, k crops


def _first_pass(loader):
    return [(images, targets, rows) for images, targets, _, rows, _ in loader]


@pytest.mark.slow
def test_cutmix_and_mixup_mix_the_stored_targets_by_area(region_set):
    """CutMix: each crop's target is ``lam * own + (1 - lam) * partner's`` (``lam`` its own pixels'
    share), the partner the crop at ``B - 1 - i`` of the flat batch; Mixup likewise with its weights."""
    from dali_relabel.mixing import CutMixSpec, box_mask, mixup_weights

    k = 2
    plain = _first_pass(_loader(region_set, crops_per_image=k))
    cut = _first_pass(_loader(region_set, crops_per_image=k, cutmix_probability=1.0))
    mixed = _first_pass(_loader(region_set, crops_per_image=k, mixup_alpha=0.4))
    spec = CutMixSpec(1.0, 1.0, 16, seed=SEED)
    partner = torch.arange(3, -1, -1)
    for index, ((images, targets, rows), (cut_images, cut_targets, cut_rows), (_, mix_targets, mix_rows)) in \
            enumerate(zip(plain, cut, mixed)):
        assert torch.equal(rows, cut_rows) and torch.equal(rows, mix_rows)
        mask = box_mask(torch.as_tensor(spec.boxes(0, index, 4)), 16, 16)
        lam = (1 - mask.flatten(1).float().mean(1)).view(-1, 1)
        assert (lam < 1).any()
        torch.testing.assert_close(cut_targets, lam * targets + (1 - lam) * targets[partner], rtol=0, atol=1e-6)
        torch.testing.assert_close(cut_images, torch.where(mask.unsqueeze(1), images[partner], images))
        weights = mixup_weights(4, 0.4, SEED, 0, index).view(-1, 1)
        torch.testing.assert_close(mix_targets, weights * targets + (1 - weights) * targets[partner],
                                   rtol=0, atol=1e-6)


def _train_script():
    """``pipelines/train.py`` as a module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "pipelines"))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train


@pytest.mark.slow
def test_train_py_trains_an_epoch_from_a_region_store(region_set, tmp_path):
    train = _train_script()
    out = str(tmp_path / "run")
    argv = ["--data", region_set.images, "--store", region_set.store, "--model", "tiny_cnn", "--image-size", "16",
            "--num-threads", "1", "--device", "cpu", "--output-dir", out, "--warmup-epochs", "0", "--epochs", "1",
            "--batch-size", "4", "--crops-per-image", "2", "--color-jitter", "0.2", "0.2", "0.2", "0",
            "--cutmix-probability", "0.5", "--print-freq", "1"]
    result = train.main(train.get_args_parser().parse_args(argv))
    assert result["epoch"] == 0 and math.isfinite(result["train_loss"])
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["num_classes"] == CLASSES
    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert checkpoint["data"]["data"]["targets"] == "regions"


@pytest.mark.slow
def test_train_py_trains_an_epoch_from_a_region_stores_shards(region_shards, tmp_path):
    train = _train_script()
    out = str(tmp_path / "run")
    argv = ["--shards", region_shards.directory, "--model", "tiny_cnn", "--image-size", "16", "--num-threads", "1",
            "--device", "cpu", "--output-dir", out, "--warmup-epochs", "0", "--epochs", "1", "--batch-size", "4",
            "--crops-per-image", "2", "--cutmix-probability", "0.5", "--print-freq", "1"]
    result = train.main(train.get_args_parser().parse_args(argv))
    assert result["epoch"] == 0 and math.isfinite(result["train_loss"])
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["num_classes"] == CLASSES


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2])
def test_gpu_region_crops_match_the_cpu_crops(region_set, k):
    """The mixed decoder cuts the same stored windows, flips them alike, and the dense targets made on
    the GPU equal the CPU's (PNG decodes are lossless on both)."""
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(image_size=16, num_threads=1, seed=SEED, crops_per_image=k, cutmix_probability=0.5)
    results = {}
    for device in ("cpu", "cuda"):
        loader = ReLabelLoader(region_set.images, region_set.store, batch_size=4, config=config, device=device,
                               return_rows=True, return_geometry=True)
        results[device] = [(i.cpu(), t.cpu(), r.cpu(), {n: v.cpu() for n, v in g.items()}) for i, t, r, g in loader]
        if device == "cuda":
            assert loader.device == "gpu"
    assert len(results["cpu"]) == len(results["cuda"]) == len(region_set.relpaths) * k // 4
    for (images, targets, rows, geometry), (g_images, g_targets, g_rows, g_geometry) in zip(results["cpu"],
                                                                                          results["cuda"]):
        assert torch.equal(rows, g_rows) and torch.equal(geometry["window"], g_geometry["window"])
        assert torch.equal(geometry["flip"], g_geometry["flip"])
        torch.testing.assert_close(g_targets, targets, rtol=1e-5, atol=1e-6)
        assert float((g_images - images).abs().mean()) < 0.05
