"""ImageNet-scale start-up: opening a store and building a loader must not grow with N.

Two stores of 12,800 and 128,000 rows (tiny maps: the cost under test is per row, not per value) over
trees of empty files. After the first check of each tree (the listing, remembered), opening the
store, checking it against the tree and preparing the loader's source do no per-row Python work: no
listing, no decoding of every path, no scan of every value; their time stays flat, and the source
handed to a spawned worker pickles to a few kilobytes whatever N is.
"""
import os
import pickle
import time

import numpy as np
import pytest

import dali_relabel.tree_check as tree_check
from dali_relabel.paths import PathTable
from dali_relabel.store import LabelStore, write_store
from dali_relabel.tree_check import check_store_matches_images

pytestmark = pytest.mark.slow  # writes 140,800 files and two stores: about 15 s

CLASSES = 1000


def _relpaths(n):
    return [f"n{i % CLASSES:08d}/n{i % CLASSES:08d}_{i:07d}.JPEG" for i in range(n)]


def _make(root, n):
    paths = sorted(_relpaths(n))
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, "images", f"n{c:08d}"), exist_ok=True)
    for path in paths:
        open(os.path.join(root, "images", path), "wb").close()
    rng = np.random.default_rng(n)
    labels = np.array([int(p[1:9]) for p in paths], np.int32)
    store = write_store(os.path.join(root, "store.h5"), paths, rng.normal(size=(n, 1, 1, 1)).astype(np.float16),
                        labels.reshape(n, 1, 1, 1), CLASSES, labels=labels,
                        class_names=[f"n{c:08d}" for c in range(CLASSES)])
    return os.path.join(root, "images"), store


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        yield {n: _make(str(tmp_path_factory.mktemp(f"n{n}")), n) for n in (12_800, 128_000)}
    finally:
        if previous is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = previous


def _forbid_per_row_work(monkeypatch):
    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} does per-row Python work at start-up")
        return fail

    monkeypatch.setattr(tree_check, "list_images", forbidden("listing the tree"))
    monkeypatch.setattr(PathTable, "tolist", forbidden("decoding every path"))
    monkeypatch.setattr(LabelStore, "check_values", forbidden("scanning every value"))


def _start_up(image_root, store_path):
    """What a rank does before its pipeline is built: open, check against the tree, confine paths."""
    store = LabelStore(store_path)
    check_store_matches_images(store, image_root)
    store.paths.check_confined("stored image paths")
    return store


def test_start_up_is_flat_in_the_number_of_rows(two_sizes, monkeypatch):
    for image_root, store_path in two_sizes.values():
        check_store_matches_images(LabelStore(store_path), image_root)  # the one listing, remembered
    _forbid_per_row_work(monkeypatch)
    seconds = {}
    for n, (image_root, store_path) in two_sizes.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            store = _start_up(image_root, store_path)
            times.append(time.perf_counter() - started)
            assert len(store) == n
        seconds[n] = min(times)
    assert seconds[128_000] < 1.0, seconds
    assert seconds[128_000] < 4 * seconds[12_800] + 0.15, f"start-up grows with N: {seconds}"


def test_the_source_sent_to_a_worker_does_not_grow_with_n(two_sizes):
    from dali_relabel.plan import EpochPlan
    from dali_relabel.sources import BatchSource, EpochControl

    sizes = {}
    for n, (image_root, store_path) in two_sizes.items():
        control = EpochControl()
        source = BatchSource(image_root, EpochPlan(n, 256), control, store_path=store_path, epochs=True)
        source.batch_rows(0, 0)  # the epoch's rows are cached in this process, not pickled
        clone = pickle.loads(pickle.dumps(source))
        sizes[n] = len(pickle.dumps(source))
        control.begin(0, 0, 0, 1)

        class Info:
            epoch_idx, iteration = 0, 0

        out = dict(zip(clone.names, clone(Info())))
        rows = out["rows"].reshape(-1)
        assert bytes(out["paths"][0]).rstrip(b"\0").decode().endswith(
            LabelStore(store_path).paths[int(rows[0])])
        control.close()
    assert max(sizes.values()) < 16_384, sizes
    assert sizes[128_000] <= sizes[12_800] + 64, sizes
