"""Converting FKD's soft-label files (one torch.save'd [coords, flip_status, output] per image, in
their layout <dir>/<class>/<stem>.tar) into a region store, and refusing bad files by name."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dali_relabel.store import PARTIAL_SUFFIX, RegionStore, RegionWriter
from dali_relabel.tools.convert import ConversionError
from dali_relabel.tools.convert_fkd import convert_fkd, fkd_relpath, load_fkd_file, read_fkd_file
from helpers import make_jpeg_tree

NUM_CLASSES, PER_CLASS, R, K = 12, 3, 8, 5
N = 3 * PER_CLASS  # three class folders of images, twelve classes of soft labels
SIZES = [(17 + 3 * i, 23 + 2 * i) for i in range(N)]  # (H, W), a different size per image


class Smuggled:
    """Something that is not a numpy array, pickled into a soft-label file."""


def fkd_rows(n=N, regions=R, k=K, seed=0):
    """What FKD's generator saves per image: coords float32 (top/H, left/W, h/H, w/W), flips bool, and
    label_quantization's output [R, 2, k] (class indices as floats, then probabilities)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        h, w = rng.uniform(0.1, 1, regions), rng.uniform(0.1, 1, regions)
        top, left = rng.uniform(0, 1, regions) * (1 - h), rng.uniform(0, 1, regions) * (1 - w)
        coords = np.stack([top, left, h, w], axis=1).astype(np.float32)
        flips = rng.random(regions) < 0.5
        probs = rng.dirichlet(np.ones(NUM_CLASSES), regions)
        order = np.argsort(-probs, axis=1)[:, :k]
        values = np.take_along_axis(probs, order, axis=1)
        output = np.stack([order.astype(np.float32), values.astype(np.float32)], axis=1)
        rows.append([coords, flips, output])
    return rows


def write_fkd_tree(root, relpaths, rows):
    for rel, row in zip(relpaths, rows):
        path = os.path.join(root, fkd_relpath(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(row, path)


@pytest.fixture
def release(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "fkd" / "train"
    relpaths = make_jpeg_tree(images, 3, PER_CLASS, sizes=SIZES, seed=1)
    rows = fkd_rows()
    write_fkd_tree(labels, relpaths, rows)
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"class_{c:02d}\n" for c in range(NUM_CLASSES)))
    return dict(images=images, labels=labels, relpaths=relpaths, rows=rows, tmp=tmp_path,
                class_names=[f"class_{c:02d}" for c in range(NUM_CLASSES)], names_file=names)


def _convert(r, out_name="fkd.h5", **kw):
    args = dict(num_classes=NUM_CLASSES, class_names=r["class_names"], workers=2, progress=False, chunk_rows=4)
    args.update(kw)
    out = r["tmp"] / out_name
    return convert_fkd(r["labels"], r["images"], out, **args), out


def _check_every_row(store, r, regions=R):
    assert store.paths.tolist() == r["relpaths"]
    for row, (coords, flips, output) in enumerate(r["rows"]):
        height, width = SIZES[row]
        got = store.read([row])
        expected = np.stack([coords[:, 1] * width, coords[:, 0] * height, coords[:, 3] * width,
                             coords[:, 2] * height], axis=1)[:regions]
        np.testing.assert_allclose(got.boxes[0], expected, rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(got.flips[0], flips[:regions].astype(np.uint8))
        np.testing.assert_array_equal(got.class_ids[0], output[:regions, 0].astype(np.int64))
        np.testing.assert_array_equal(got.values[0], output[:regions, 1].astype(np.float16))
        assert store.labels[row] == row // PER_CLASS and tuple(store.image_sizes[row]) == (height, width)


def test_fkd_layout_and_file_contents(release):
    assert fkd_relpath("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026.tar"
    assert fkd_relpath("c/a.b.jpg") == "c/a.tar"  # FKD cuts the name at its first dot
    path = os.path.join(release["labels"], "class_01", "img_002.tar")
    coords, flips, output = torch.load(path, weights_only=False)  # as FKD's own loader reads it
    assert coords.dtype == np.float32 and coords.shape == (R, 4) and flips.dtype == np.bool_
    assert output.shape == (R, 2, K)
    loaded = load_fkd_file(path)  # weights-only, numpy globals allowed
    for a, b in zip(loaded, (coords, flips, output)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_convert_writes_every_row(release):
    report, out = _convert(release)
    assert report.rows == N and report.images_without_map == [] and report.files_with_more_crops == []
    store = RegionStore(out, verify="full")
    assert (store.regions, store.k, store.label_type, store.num_classes) == (R, K, "marginal_smoothing", NUM_CLASSES)
    assert store.header.source == "fkd:marginal_smoothing_k5" and not os.path.exists(str(out) + PARTIAL_SUFFIX)
    _check_every_row(store, release)


@pytest.mark.slow
def test_convert_keeps_the_first_r_crops_and_refuses_fewer(release):
    report, out = _convert(release, regions=5)
    assert len(report.files_with_more_crops) == N
    _check_every_row(RegionStore(out), release, regions=5)
    short = fkd_rows(1, regions=R - 2, seed=9)[0]
    target = os.path.join(release["labels"], fkd_relpath(release["relpaths"][4]))
    torch.save(short, target)
    with pytest.raises(ConversionError, match=rf"{target}: holds {R - 2} crops, fewer than the {R} stored"):
        _convert(release, out_name="short.h5")


@pytest.mark.slow
def test_an_interrupted_conversion_resumes(release, monkeypatch):
    original = RegionWriter.write
    calls = []

    def failing(self, start, *args, **kwargs):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(RegionWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        _convert(release)
    monkeypatch.setattr(RegionWriter, "write", original)
    report, out = _convert(release)
    assert report.resumed_from_row == 4
    _check_every_row(RegionStore(out, verify="full"), release)


@pytest.mark.slow
def test_cli_converts_fkd_files(release, capsys):
    from dali_relabel.tools.cli import main

    out = release["tmp"] / "cli.h5"
    assert main(["convert", "--fkd", str(release["labels"]), "--images", str(release["images"]), "--out", str(out),
                 "--num-classes", str(NUM_CLASSES), "--class-names", str(release["names_file"]),
                 "--fkd-label-type", "marginal_renorm", "--workers", "1", "--quiet"]) == 0
    assert f"wrote {N} rows" in capsys.readouterr().out
    assert RegionStore(out).label_type == "marginal_renorm"
    assert main(["verify", str(out)]) == 0


def test_a_missing_file_is_named(release):
    missing = os.path.join(release["labels"], fkd_relpath(release["relpaths"][3]))
    os.remove(missing)
    with pytest.raises(ConversionError, match=r"1 images have no map \(first: class_01/img_000.JPEG\)"):
        _convert(release)
    with pytest.raises(ConversionError, match=rf"{missing}: missing"):
        load_fkd_file(missing)


def test_the_train_folder_is_pointed_at(release):
    with pytest.raises(ConversionError, match="pass .*fkd/train"):
        convert_fkd(release["labels"].parent, release["images"], release["tmp"] / "x.h5", num_classes=NUM_CLASSES,
                    class_names=release["class_names"], progress=False)


def _save(tmp_path, value, name="bad.tar"):
    path = os.fspath(tmp_path / name)
    torch.save(value, path)
    return path


def _read(path, label_type="marginal_smoothing_k5", regions=R, size=(40, 50)):
    return read_fkd_file(path, label_type, NUM_CLASSES, regions, size)


def test_pickled_objects_are_refused_naming_them(tmp_path):
    coords, flips, output = fkd_rows(1)[0]
    path = _save(tmp_path, [coords, flips, output, Smuggled()])
    with pytest.raises(ConversionError, match=rf"{path}: refused: it needs .*Smuggled"):
        load_fkd_file(path)
    path = _save(tmp_path, [coords, flips, np.float64(3.0)], "scalar.tar")
    with pytest.raises(ConversionError, match=r"refused: it needs numpy.*scalar"):
        load_fkd_file(path)
    path = _save(tmp_path, [coords, flips, np.array([{"a": 1}], dtype=object)], "objects.tar")
    with pytest.raises(ConversionError, match=rf"{path}: "):
        load_fkd_file(path)


BAD_FILES = {
    "two parts": (lambda c, f, o: [c, f], r"expected \[coords, flip_status, output\], found a list of 2"),
    "a dict": (lambda c, f, o: {"coords": c}, r"expected \[coords, flip_status, output\], found dict"),
    "coords [R, 3]": (lambda c, f, o: [c[:, :3], f, o], r"coords of shape \(8, 3\), expected \[R, 4\]"),
    "flips [R - 1]": (lambda c, f, o: [c, f[:-1], o], r"flip_status of shape \(7,\), expected \[8\]"),
    "output k = 4": (lambda c, f, o: [c, f, o[:, :, :4]], r"output of shape \(8, 2, 4\) .* expected \[R, 2, 5\]"),
    "box past the edge": (lambda c, f, o: [np.vstack([[0.5, 0.2, 0.7, 0.3], c[1:]]).astype(np.float32), f, o],
                          r"crop 0: box .* is not inside its 50x40 \(WxH\) image"),
    "class 12": (lambda c, f, o: [c, f, np.concatenate([np.full((8, 1, 5), 12.0), o[:, 1:]], axis=1)],
                 r"crop 0: class ids \[12, 12, 12, 12, 12\] are not all in \[0, 12\)"),
    "fractional class": (lambda c, f, o: [c, f, o + np.array([0.5, 0])[None, :, None]],
                         r"class indices are not whole numbers"),
    "sum above 1": (lambda c, f, o: [c, f, np.concatenate([o[:, :1], np.full((8, 1, 5), 0.3)], axis=1)],
                    r"crop 0: probabilities sum to 1.5"),
    "nan probability": (lambda c, f, o: [c, f, np.concatenate([o[:, :1], np.full((8, 1, 5), np.nan)], axis=1)],
                        r"crop 0: probabilities .* not all finite"),
    "flip 2": (lambda c, f, o: [c, np.full(8, 2, np.int64), o], r"crop 0: flip flag 2 is neither 0 nor 1"),
    "strings": (lambda c, f, o: [c, f, "output"], r"output must be a numeric array, found str"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_refused_naming_the_file(tmp_path, name):
    make, message = BAD_FILES[name]
    path = _save(tmp_path, make(*fkd_rows(1)[0]))
    with pytest.raises(ConversionError, match=message) as caught:
        _read(path)
    assert str(caught.value).startswith(path)


def test_fewer_crops_than_asked_name_the_file(tmp_path):
    path = _save(tmp_path, fkd_rows(1, regions=3)[0])
    with pytest.raises(ConversionError, match=rf"{path}: holds 3 crops, fewer than the {R} stored per image"):
        _read(path)


def test_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "cut.tar"
    path.write_bytes(open(_save(tmp_path, fkd_rows(1)[0]), "rb").read()[:100])
    with pytest.raises(ConversionError, match=rf"{path}: cannot be loaded"):
        _read(os.fspath(path))


def test_hard_and_smoothing_files_become_top_1(tmp_path):
    coords, flips, output = fkd_rows(1)[0]
    hard = _save(tmp_path, [coords, flips, output[:, 0, 0].astype(np.int64)], "hard.tar")
    boxes, got_flips, ids, values, count = _read(hard, "hard")
    assert ids.shape == (R, 1) and (values == 1).all() and count == R
    np.testing.assert_array_equal(ids[:, 0], output[:, 0, 0])
    smooth = _save(tmp_path, [coords, flips, output[:, :, 0]], "smoothing.tar")
    _, _, ids, values, _ = _read(smooth, "smoothing")
    np.testing.assert_array_equal(values[:, 0], output[:, 1, 0])
    np.testing.assert_allclose(boxes[:, 0], coords[:, 1] * 50, rtol=1e-6)
    np.testing.assert_array_equal(got_flips, flips)


def test_boxes_ending_a_hair_past_the_edge_are_clipped(tmp_path):
    coords, flips, output = fkd_rows(1)[0]
    coords[0] = [0.5, 0.25, 0.5001, 0.75]  # ends 0.004 px past the bottom of a 40 px high image: float32 noise
    boxes, *_ = _read(_save(tmp_path, [coords, flips, output]))
    assert boxes[0, 1] == 20 and boxes[0, 3] == 20 and boxes[0, 0] + boxes[0, 2] == 50
    coords[0, 2] = 0.501  # 0.04 px past: refused
    with pytest.raises(ConversionError, match="crop 0: box .* is not inside"):
        _read(_save(tmp_path, [coords, flips, output], "past.tar"))
