"""End to end on CPU: source + DALI graph + fused operator + iterator.

The matching test makes every image a flat colour that encodes its row id and every map a logit
peak at the class equal to that row id; whatever the shuffling, workers and shards, each target
must come from its own image's map.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.config import DataConfig
from dali_relabel.store import StoreError, write_store

pytest.importorskip("nvidia.dali")

STEP = 23  # colour levels between neighbouring ids: far above JPEG error


def _id_colour(row):
    return (20 + STEP * (row % 10), 20 + STEP * (row // 10), 128)


def make_id_dataset(root, num_images, num_classes_folders=3, map_grid=(4, 6)):
    """Images coloured by row id, maps peaking at class == row id; returns the store path."""
    image_root = os.path.join(root, "images")
    paths = []
    for row in range(num_images):
        folder = f"class{row % num_classes_folders}"
        os.makedirs(os.path.join(image_root, folder), exist_ok=True)
        paths.append(f"{folder}/img{row:03d}.JPEG")
    paths.sort()
    rng = np.random.default_rng(0)
    for row, path in enumerate(paths):
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        colour = np.array(_id_colour(row), np.uint8)
        Image.fromarray(np.broadcast_to(colour, size + (3,)).copy()).save(os.path.join(image_root, path),
                                                                          quality=95)
    k, (gh, gw) = 3, map_grid
    n = num_images
    logits = np.zeros((n, k, gh, gw), np.float16)
    logits[:, 0] = 12.0
    logits[:, 1:] = rng.normal(size=(n, k - 1, gh, gw))
    ids = np.zeros((n, k, gh, gw), np.int64)
    for row in range(n):
        ids[row, 0] = row
        others = [c for c in range(n) if c != row]
        ids[row, 1:] = rng.choice(others, size=(k - 1) * gh * gw).reshape(k - 1, gh, gw) if k > 1 else 0
        for j in range(gh * gw):  # keep classes distinct within a cell
            cell = ids[row, 1:].reshape(k - 1, -1)[:, j]
            if len(set(cell)) < len(cell):
                ids[row, 1:].reshape(k - 1, -1)[:, j] = rng.choice(others, size=k - 1, replace=False)
    labels = [int(p.split("/")[0][5:]) for p in paths]
    store = os.path.join(root, "store.h5")
    names = [f"class{c}" for c in range(num_classes_folders)] + [f"unused{c}" for c in range(n - num_classes_folders)]
    write_store(store, paths, logits, ids, n, class_names=names, labels=labels, layout="HW")
    return image_root, store


def _row_from_pixels(images, config):
    mean = 255 * torch.tensor(config.mean).view(1, 3)
    std = 255 * torch.tensor(config.std).view(1, 3)
    rgb = images.float().mean(dim=(2, 3)) * std + mean
    low = torch.round((rgb[:, 0] - 20) / STEP)
    high = torch.round((rgb[:, 1] - 20) / STEP)
    return (high * 10 + low).long()


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory):
    return make_id_dataset(str(tmp_path_factory.mktemp("ids")), 42)


@pytest.mark.slow
@pytest.mark.parametrize("workers, threads", [(0, 1), (0, 3), (2, 1), (2, 3)])
def test_every_target_comes_from_its_own_image_across_epochs_workers_and_shards(id_dataset, workers, threads):
    """2 ranks x 3 epochs, the source in this process (prefetched on a thread) or in 2 DALI workers,
    1 or 3 DALI threads: every image and target of a batch belong to the row the batch names."""
    from dali_relabel.loader import ReLabelLoader

    image_root, store = id_dataset
    config = DataConfig(image_size=24, py_num_workers=workers, num_threads=threads, last_batch="pad", seed=3)
    loaders = [ReLabelLoader(image_root, store, batch_size=8, config=config, device="cpu", rank=r,
                             world_size=2, return_labels=True, return_rows=True) for r in range(2)]
    assert [len(loader) for loader in loaders] == [3, 3]  # 21 rows per rank, batches of 8
    orders = []
    for epoch in range(3):
        per_rank = []
        for loader in loaders:
            rows_seen = []
            for images, targets, labels, rows in loader:
                assert images.shape[1:] == (3, 24, 24) and targets.shape[1] == 42
                torch.testing.assert_close(targets.sum(1), torch.ones(len(rows)))
                assert torch.equal(targets.argmax(1), rows), "a target came from another row's map"
                assert torch.equal(_row_from_pixels(images, config), rows), "image/row mismatch"
                rows_seen += rows.tolist()
            per_rank.append(rows_seen)
        assert not set(per_rank[0]) & set(per_rank[1]), "the shards overlap"
        assert sorted(per_rank[0] + per_rank[1]) == list(range(42)), "an epoch lost or repeated samples"
        orders.append(per_rank[0])
    assert orders[0] != orders[1] != orders[2], "the order did not change between epochs"


@pytest.mark.slow
def test_drop_last_gives_full_batches_and_spawn_works(id_dataset):
    from dali_relabel.loader import ReLabelLoader

    image_root, store = id_dataset
    config = DataConfig(image_size=16, py_num_workers=1, num_threads=1, py_start_method="spawn")
    loader = ReLabelLoader(image_root, store, batch_size=10, config=config, device="cpu", return_rows=True)
    sizes = [len(rows) for _, targets, rows in loader if torch.equal(targets.argmax(1), rows)]
    assert sizes == [10, 10, 10, 10]


@pytest.mark.slow
def test_token_targets_and_float16_channels_last(id_dataset):
    from dali_relabel.loader import ReLabelLoader

    image_root, store = id_dataset
    config = DataConfig(image_size=16, output_size=(2, 2), output_dtype="float16", channels_last=True,
                        py_num_workers=1, num_threads=1)
    images, targets = next(iter(ReLabelLoader(image_root, store, batch_size=4, config=config, device="cpu")))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last), "PyTorch's channels_last: NCHW shape, NHWC strides"
    assert targets.shape == (4, 42, 2, 2)
    torch.testing.assert_close(targets.sum(1), torch.ones(4, 2, 2))


@pytest.mark.slow
def test_validation_loader_sees_every_image_once(id_dataset):
    from dali_relabel.loader import ValidationLoader

    image_root, _ = id_dataset
    config = DataConfig(image_size=24, val_resize=32, py_num_workers=1, num_threads=1)
    loader = ValidationLoader(image_root, batch_size=8, config=config, device="cpu", return_rows=True)
    seen = []
    for images, labels, rows in loader:
        assert images.shape[1:] == (3, 24, 24)
        assert torch.equal(_row_from_pixels(images, config), rows)
        assert torch.equal(labels, torch.tensor([loader.images.labels[r] for r in rows]))
        seen += rows.tolist()
    assert sorted(seen) == list(range(42))


def test_store_for_another_image_set_is_refused(id_dataset, tmp_path):
    from dali_relabel.loader import ReLabelLoader

    _, store = id_dataset
    other_root, _ = make_id_dataset(str(tmp_path), 6)
    with pytest.raises(StoreError, match=r"row \d+ refers to class\d/img\d+.JPEG, which is not under"):
        ReLabelLoader(other_root, store, batch_size=2, device="cpu")


def test_image_without_map_is_refused(tiny_set_copy):
    from dali_relabel.loader import ReLabelLoader

    image_root, store = tiny_set_copy.images, tiny_set_copy.store
    Image.new("RGB", (20, 20)).save(os.path.join(image_root, "class_00", "zz_extra.JPEG"))
    with pytest.raises(StoreError, match="1 images under .* have no map, first: class_00/zz_extra.JPEG"):
        ReLabelLoader(image_root, store, batch_size=2, device="cpu")


@pytest.mark.slow
def test_batch_of_one_and_reshuffling(id_dataset):
    # The authors' batch function breaks on a batch of one and never reshuffles; ours must not.
    from dali_relabel.loader import ReLabelLoader

    image_root, store = id_dataset
    config = DataConfig(image_size=16, py_num_workers=1, num_threads=1)
    loader = ReLabelLoader(image_root, store, batch_size=1, config=config, device="cpu", return_rows=True)
    orders = []
    for _ in range(2):
        rows = []
        for images, targets, batch_rows in loader:
            assert images.shape == (1, 3, 16, 16) and targets.shape == (1, 42)
            assert targets.argmax(1).item() == batch_rows.item()
            rows.append(batch_rows.item())
        assert sorted(rows) == list(range(42))
        orders.append(rows)
    assert orders[0] != orders[1]


@pytest.mark.slow
def test_resume_in_the_middle_of_an_epoch_yields_exactly_the_rest(id_dataset):
    from dali_relabel.loader import ReLabelLoader

    image_root, store = id_dataset
    config = DataConfig(image_size=16, py_num_workers=1, num_threads=1, seed=9)
    full = ReLabelLoader(image_root, store, batch_size=5, config=config, device="cpu", return_rows=True,
                         start_epoch=3)
    batches = [rows.tolist() for _, _, rows in full]
    resumed = ReLabelLoader(image_root, store, batch_size=5, config=config, device="cpu", return_rows=True,
                            start_epoch=3, resume_batch=3)
    assert len(resumed) == len(batches) - 3
    assert [rows.tolist() for _, _, rows in resumed] == batches[3:]
    state = resumed.state_dict()
    assert (state["epoch"], state["batch"], state["batch_size"]) == (4, 0, 5)
    assert len(resumed) == len(batches), "the epoch after a resumed one is whole again"
