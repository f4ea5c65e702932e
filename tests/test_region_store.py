"""The region store: written, read back row by row, its bad input refused naming the row, its keyed
crop choice checked against a Python twin and its dense targets against FKD's recovery."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from dali_relabel.crops import SplitMix64
from dali_relabel.outputs import OutputBusyError
from dali_relabel.store import (PARTIAL_SUFFIX, REGION_STREAM, LabelStore, RegionStore, RegionWriter, StoreError,
                                dense_targets, open_store, select_regions, store_kind, summarize_store,
                                write_region_store, write_store)
from helpers import random_maps

N, R, K, C = 10, 6, 3, 7
SIZES = np.array([(20 + i, 30 + 2 * i) for i in range(N)], np.int32)  # (H, W)


def random_regions(n=N, regions=R, k=K, num_classes=C, seed=0, sizes=SIZES):
    """Valid rows: boxes inside each image, flips 0/1, distinct ids, probabilities summing below 1."""
    rng = np.random.default_rng(seed)
    h, w = sizes[:n, 0:1].astype(np.float64), sizes[:n, 1:2].astype(np.float64)
    bw, bh = rng.uniform(1, w, (n, regions)), rng.uniform(1, h, (n, regions))
    x0, y0 = rng.uniform(0, 1, (n, regions)) * (w - bw), rng.uniform(0, 1, (n, regions)) * (h - bh)
    boxes = np.stack([x0, y0, bw, bh], axis=-1).astype(np.float32)
    flips = rng.integers(0, 2, (n, regions)).astype(np.uint8)
    ids = np.argsort(rng.random((n, regions, num_classes)), axis=-1)[..., :k]
    values = np.sort(rng.dirichlet(np.ones(num_classes), (n, regions))[..., :k], axis=-1)[..., ::-1]
    return dict(boxes=boxes, flips=flips, class_ids=ids, values=values.astype(np.float32),
                image_sizes=sizes[:n].copy(), labels=np.arange(n) % num_classes)


PATHS = [f"class_{i % C:02d}/img_{i:03d}.JPEG" for i in range(N)]


def _write(path, d=None, label_type="marginal_smoothing", **kw):
    d = random_regions() if d is None else d
    return write_region_store(path, PATHS[:len(d["boxes"])], d["boxes"], d["flips"], d["class_ids"], d["values"],
                              d["image_sizes"], num_classes=C, label_type=label_type, labels=d["labels"], **kw)


def _writer(path, **kw):
    args = dict(num_classes=C, regions=R, k=K, label_type="marginal_smoothing",
                class_names=[f"class_{i}" for i in range(C)])
    args.update(kw)
    return RegionWriter(path, PATHS, **args)


def _rows(d, start, stop):
    return (d["boxes"][start:stop], d["flips"][start:stop], d["class_ids"][start:stop], d["values"][start:stop],
            d["image_sizes"][start:stop], d["labels"][start:stop])


def test_every_row_reads_back_as_written(tmp_path):
    d = random_regions()
    store = RegionStore(_write(tmp_path / "r.h5", d, values_dtype=np.float32), verify="full")
    assert (len(store), store.num_classes, store.regions, store.k, store.label_type) == (N, C, R, K,
                                                                                         "marginal_smoothing")
    assert store.class_ids_dtype == np.uint8 and store.paths.tolist() == PATHS
    np.testing.assert_array_equal(store.labels, d["labels"])
    np.testing.assert_array_equal(store.image_sizes, SIZES)
    for row in range(N):
        got = store.read([row])
        np.testing.assert_array_equal(got.boxes[0], d["boxes"][row])
        np.testing.assert_array_equal(got.flips[0], d["flips"][row])
        np.testing.assert_array_equal(got.class_ids[0], d["class_ids"][row])
        np.testing.assert_array_equal(got.values[0], d["values"][row])
        assert store.row_of(PATHS[row]) == row


def test_read_gathers_selected_crops_of_a_batch(tmp_path):
    d = random_regions()
    store = RegionStore(_write(tmp_path / "r.h5", d))
    rows = np.array([7, 2, 7, 0])
    crops = store.select(seed=3, epoch=1, rows=rows, count=4)
    got = store.read(rows, crops)
    assert got.boxes.shape == (4, 4, 4) and got.flips.shape == (4, 4) and got.values.shape == (4, 4, K)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(got.boxes[i], d["boxes"][row][crops[i]])
        np.testing.assert_array_equal(got.class_ids[i], d["class_ids"][row][crops[i]])
        np.testing.assert_array_equal(got.values[i], d["values"][row][crops[i]].astype(np.float16))
    np.testing.assert_array_equal(crops[0], crops[2])  # same row, same epoch: same choice


def _twin_select(seed, epoch, row, count, regions):
    """The keyed choice in Python integers: SplitMix64's finalizer, the crops' key, one uniform per crop."""
    mix = lambda x: SplitMix64(x).next()  # noqa: E731  (state + gamma, then the finalizer)
    mask = (1 << 64) - 1
    key = mix((mix((mix(seed) + epoch) & mask) + row) & mask)
    base = mix(0xA0761D6478BD642F ^ REGION_STREAM)
    uniforms = [(mix(key ^ mix((base + j) & mask)) >> 11) * 2.0 ** -53 for j in range(regions)]
    return [j for _, j in sorted((u, j) for j, u in enumerate(uniforms))][:count]


@pytest.mark.parametrize("seed,epoch", [(0, 0), (7, 3), (2 ** 40 + 5, 11)])
def test_selection_matches_its_python_twin(seed, epoch):
    rows = np.array([0, 1, 5, 123456, 5])
    chosen = select_regions(seed, epoch, rows, 5, 40)
    assert chosen.shape == (5, 5) and chosen.dtype == np.int64
    for i, row in enumerate(rows):
        assert chosen[i].tolist() == _twin_select(seed, epoch, int(row), 5, 40)
        assert len(set(chosen[i].tolist())) == 5


def test_selection_changes_with_the_epoch_and_covers_every_crop():
    per_epoch = [select_regions(1, e, [4], 2, R)[0].tolist() for e in range(60)]
    assert len({tuple(c) for c in per_epoch}) > 5
    assert {j for c in per_epoch for j in c} == set(range(R))


def test_asking_more_crops_than_stored_is_refused_naming_the_row(tmp_path):
    store = RegionStore(_write(tmp_path / "r.h5"))
    with pytest.raises(StoreError, match=rf"row 3 \({PATHS[3]}\) has {R} stored crops, fewer than the {R + 1}"):
        store.select(0, 0, [3, 4], R + 1)


def _fkd_recover(ids, values, num_classes, label_type):
    """FKD's Recover_soft_label (utils_FKD.py), re-derived from its description: top-k scattered over
    the marginal (1 - sum) / (C - k), or the top-k renormalised."""
    n, k = ids.shape
    if label_type == "marginal_smoothing":
        minor = (1 - values.sum(axis=1, keepdims=True)) / (num_classes - k)
        out = np.repeat(minor, num_classes, axis=1)
    else:
        out = np.zeros((n, num_classes))
    out[np.arange(n)[:, None], ids] = values
    if label_type == "marginal_renorm":
        out /= out.sum(axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("label_type", ["marginal_smoothing", "marginal_renorm"])
def test_dense_targets_recover_fkd_targets(label_type):
    d = random_regions()
    ids, values = d["class_ids"].reshape(-1, K), d["values"].reshape(-1, K)
    dense = dense_targets(ids, values, C, label_type)
    assert dense.dtype == torch.float32 and tuple(dense.shape) == (N * R, C)
    np.testing.assert_allclose(dense.numpy(), _fkd_recover(ids, values.astype(np.float64), C, label_type),
                               atol=1e-6)
    np.testing.assert_allclose(dense.sum(dim=1).numpy(), 1, atol=1e-5)
    batched = dense_targets(torch.from_numpy(d["class_ids"]), torch.from_numpy(d["values"]), C, label_type)
    assert tuple(batched.shape) == (N, R, C)
    np.testing.assert_array_equal(batched.reshape(-1, C).numpy(), dense.numpy())


def test_dense_targets_of_a_full_top_k_and_of_one_hot():
    ids = np.array([[2, 0, 1]])
    full = dense_targets(ids, np.array([[0.5, 0.3, 0.2]]), 3, "marginal_smoothing")
    np.testing.assert_allclose(full.numpy(), [[0.3, 0.2, 0.5]], atol=1e-7)
    hard = dense_targets(np.array([[4]]), np.array([[1.0]]), 6, "marginal_smoothing")
    np.testing.assert_array_equal(hard.numpy(), np.eye(6)[[4]])


def test_header_and_provenance(tmp_path):
    store = RegionStore(_write(tmp_path / "r.h5", teacher="effnet", teacher_input_size=475, source="test"))
    h = store.header
    assert (h.teacher, h.teacher_input_size, h.source, h.format_version, h.values_checked) == \
        ("effnet", 475, "test", 1, True)
    with h5py.File(store.path, "r") as f:
        assert f.attrs["format"] == "dali-relabel-region-store" and f.attrs["label_type"] == "marginal_smoothing"
        assert f["values"].dtype == np.float16 and f["boxes"].dtype == np.float32 and f["flips"].dtype == np.uint8


# -- bad input: refused at write, naming the row, its image and the crop ---------------------------------
def _bad(change):
    d = random_regions()
    change(d)
    return d


BAD_ROWS = {
    "box outside": (lambda d: d["boxes"].__setitem__((4, 2, 0), SIZES[4, 1]), r"row 4 .*crop 2: box .* not inside"),
    "negative x0": (lambda d: d["boxes"].__setitem__((1, 0, 0), -3), r"row 1 .*crop 0: box .* not inside"),
    "zero width": (lambda d: d["boxes"].__setitem__((2, 5, 2), 0), r"row 2 .*crop 5: box .* not inside"),
    "nan box": (lambda d: d["boxes"].__setitem__((3, 1, 3), np.nan), r"row 3 .*crop 1: box .* not finite"),
    "flip 2": (lambda d: d["flips"].__setitem__((5, 3), 2), r"row 5 .*crop 3: flip flag 2 is neither 0 nor 1"),
    "probability above 1": (lambda d: d["values"].__setitem__((6, 0, 0), 1.5), r"row 6 .*crop 0: probabilities .* \[0, 1\]"),
    "negative probability": (lambda d: d["values"].__setitem__((6, 4, 2), -0.1), r"row 6 .*crop 4: .*\[0, 1\]"),
    "sum above 1": (lambda d: d["values"].__setitem__((7, 1), [0.6, 0.3, 0.2]), r"row 7 .*crop 1: probabilities sum to 1.1"),
    "inf probability": (lambda d: d["values"].__setitem__((8, 2, 1), np.inf), r"row 8 .*crop 2: .*not all finite"),
    "class out of range": (lambda d: d["class_ids"].__setitem__((9, 0, 1), C), r"row 9 .*crop 0: class ids .* \[0, 7\)"),
    "repeated class": (lambda d: d["class_ids"].__setitem__((0, 3), [2, 2, 5]), r"row 0 .*crop 3: .*repeat a class"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_rows_are_refused_at_write(tmp_path, name):
    change, message = BAD_ROWS[name]
    out = tmp_path / "r.h5"
    with pytest.raises(StoreError, match=message) as caught:
        _write(out, _bad(change))
    assert str(out) in str(caught.value)
    row = int(message.split()[1])
    assert PATHS[row] in str(caught.value)
    assert not os.path.exists(out)


def test_a_full_top_k_must_sum_to_one(tmp_path):
    d = random_regions(k=C)
    _write(tmp_path / "ok.h5", dict(d, values=d["values"] / d["values"].sum(axis=-1, keepdims=True)))
    with pytest.raises(StoreError, match=r"row 0 .*crop 0: probabilities of all 7 classes sum to 0.4375, not 1"):
        _write(tmp_path / "bad.h5", dict(d, values=np.full((N, R, C), 0.0625, np.float32)))


def test_renorm_needs_mass(tmp_path):
    d = random_regions()
    d["values"][2, 4] = 0
    _write(tmp_path / "smooth.h5", d)  # nothing kept: all mass spread over the rest
    with pytest.raises(StoreError, match=r"row 2 .*crop 4: probabilities sum to 0"):
        _write(tmp_path / "renorm.h5", d, label_type="marginal_renorm")


def test_fewer_crops_than_the_store_holds_are_refused(tmp_path):
    d = random_regions()
    w = _writer(tmp_path / "r.h5")
    with pytest.raises(StoreError, match=rf"rows 0..2 \(first: {PATHS[0]}\): boxes of {R - 1} stored crops per "
                                         rf"image, fewer than the store's {R}"):
        w.write(0, d["boxes"][:3, :R - 1], d["flips"][:3, :R - 1], d["class_ids"][:3, :R - 1],
                d["values"][:3, :R - 1], d["image_sizes"][:3])
    w.close()


def test_image_sizes_must_be_known(tmp_path):
    d = random_regions()
    d["image_sizes"][3] = 0
    with pytest.raises(StoreError, match=rf"row 3 \({PATHS[3]}\): image size \[0, 0\]"):
        _write(tmp_path / "r.h5", d)


def test_float16_rounding_keeps_sums_within_tolerance(tmp_path):
    d = random_regions(k=C)
    d["values"] = (d["values"] / d["values"].sum(axis=-1, keepdims=True)).astype(np.float32)
    store = RegionStore(_write(tmp_path / "r.h5", d), verify="full")
    assert np.abs(store.read(np.arange(N)).values.astype(np.float64).sum(-1) - 1).max() <= 1e-3


# -- the map store's guarantees ------------------------------------------------------------------------
def test_interrupted_write_resumes_and_hashes_identically(tmp_path, monkeypatch):
    import dali_relabel.store.region_writer as region_writer

    monkeypatch.setattr(region_writer, "REGION_HASH_CHUNK_ROWS", 4)  # 10 rows: blocks 0-3, 4-7, 8-9
    d = random_regions()
    clean = _write(tmp_path / "clean.h5", d)
    out = tmp_path / "resumed.h5"
    w = _writer(out)
    w.write(0, *_rows(d, 0, 6))
    w.close()
    assert os.path.exists(str(out) + PARTIAL_SUFFIX) and not os.path.exists(out)
    with pytest.raises(StoreError, match="interrupted"):
        RegionStore(out)
    w = _writer(out)
    assert w.rows_written == 6
    w.write(6, *_rows(d, 6, N))
    w.finish()
    resumed = RegionStore(out, verify="full")
    assert resumed.header.content_sha256 == RegionStore(clean).header.content_sha256
    with h5py.File(out, "r") as f:
        assert f["chunk_sha256"].shape == (3, 32)


def test_a_partial_write_for_another_plan_starts_again(tmp_path):
    d = random_regions()
    out = tmp_path / "r.h5"
    w = _writer(out)
    w.write(0, *_rows(d, 0, 4))
    w.close()
    assert _writer(out, label_type="marginal_renorm").rows_written == 0


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "r.h5"
    first = _writer(out)
    with pytest.raises(OutputBusyError):
        _writer(out)
    first.close()


def test_rows_must_come_in_order(tmp_path):
    d = random_regions()
    w = _writer(tmp_path / "r.h5")
    with pytest.raises(ValueError, match="expected row 0, got 2"):
        w.write(2, *_rows(d, 2, 4))
    w.close()


def test_damage_is_found_at_the_verify_level_that_reads_it(tmp_path):
    out = _write(tmp_path / "r.h5")
    with h5py.File(out, "r+") as f:
        f["values"][5, 1, 0] = f["values"][5, 1, 0] / 2  # still a valid value: only the hash tells
    RegionStore(out, verify="header")
    with pytest.raises(StoreError, match=r"content checksum mismatch in rows 0..9"):
        RegionStore(out, verify="full")
    with pytest.raises(StoreError, match="checksum mismatch"):
        RegionStore(out, verify="sample")  # one block only: here the only one


def test_full_verify_names_a_bad_value_written_behind_the_writer(tmp_path):
    out = _write(tmp_path / "r.h5")
    with h5py.File(out, "r+") as f:
        f["flips"][4, 2] = 7
    with pytest.raises(StoreError, match=rf"row 4 \({PATHS[4]}\), crop 2: flip flag 7"):
        RegionStore(out, verify="full")


def test_paths_and_header_are_checked_at_open(tmp_path):
    out = _write(tmp_path / "r.h5")
    with h5py.File(out, "r+") as f:
        f["path_bytes"][0] = ord("X")
    with pytest.raises(StoreError, match="checksum mismatch in the image paths"):
        RegionStore(out)
    out = _write(tmp_path / "r2.h5")
    with h5py.File(out, "r+") as f:
        f.attrs["label_type"] = "soft"
    with pytest.raises(StoreError, match="label_type 'soft' is not one of"):
        RegionStore(out, verify="header")
    out = _write(tmp_path / "r3.h5")
    with h5py.File(out, "r+") as f:
        del f["boxes"]
        f["boxes"] = h5py.ExternalLink("elsewhere.h5", "/boxes")
    with pytest.raises(StoreError, match="dataset 'boxes' is a link to elsewhere.h5"):
        RegionStore(out, verify="header")


def test_either_reader_refuses_the_other_kind(tmp_path):
    regions = _write(tmp_path / "r.h5")
    logits, ids = random_maps(3, 2, 3, 3, C, seed=0)
    maps = write_store(tmp_path / "m.h5", PATHS[:3], logits, ids, num_classes=C)
    with pytest.raises(StoreError, match="not a dali-relabel label store .*'dali-relabel-region-store'"):
        LabelStore(regions)
    with pytest.raises(StoreError, match="not a dali-relabel region store .*'dali-relabel-label-store'"):
        RegionStore(maps)
    assert store_kind(regions) == "region store" and store_kind(maps) == "label store"
    assert isinstance(open_store(regions), RegionStore) and isinstance(open_store(maps), LabelStore)
    assert summarize_store(open_store(regions))["kind"] == "region store"
    assert summarize_store(open_store(maps))["kind"] == "label store"


def test_the_store_pickles_and_reads_in_another_process_state(tmp_path):
    import pickle

    d = random_regions()
    store = RegionStore(_write(tmp_path / "r.h5", d))
    store.read([0])
    again = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(again.read([9]).boxes[0], d["boxes"][9])


def test_cli_info_and_verify_say_the_kind(tmp_path, capsys):
    import json

    from dali_relabel.tools.cli import main

    out = _write(tmp_path / "r.h5")
    assert main(["info", out, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "region store" and summary["rows"] == N and summary["regions"] == R
    assert main(["verify", out]) == 0
    assert "region store, 10 rows" in capsys.readouterr().out
    with h5py.File(out, "r+") as f:
        f["boxes"][0, 0, 0] = 1e6
    assert main(["verify", out, "--level", "header"]) == 0
    capsys.readouterr()
    assert main(["verify", out]) == 2
    assert "dali-relabel verify: " in capsys.readouterr().err


def test_shards_refuse_a_region_store_that_does_not_describe_the_tree(tmp_path):
    from dali_relabel.shards import write_shards

    out = _write(tmp_path / "r.h5")
    with pytest.raises(StoreError, match=r"r.h5: row 0 \(class_00/img_000.JPEG\) has label 0 = 'class_0', but lies "
                                         r"in folder 'class_00'"):
        write_shards(tmp_path, out, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards").exists()
