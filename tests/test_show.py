"""Tests of dali_relabel.tools.show: cell orientation for both layouts, PNG output, store-row errors.

Nothing here compares pixels or text, so the results do not depend on the installed fonts.
"""
import os
import sys

import numpy as np
import pytest

try:
    import dali_relabel  # noqa: F401
except ImportError:  # run without tests/conftest.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image

from dali_relabel.tools.show import cell_grid, class_mass, render_label_map, show_store_row
from dali_relabel.store import LabelStore, write_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Image-oriented 2 x 3 grid (2 row bands, 3 column bands) of distinct top-1 classes.
TOP_IMAGE = np.array([[0, 1, 2],
                      [3, 4, 5]])


def _hw_map(top=TOP_IMAGE, k=3, num_classes=9):
    """A ``[k, gh, gw]`` HW map whose top-1 classes are ``top``. The top-1 logit is deliberately not
    always at index 0, so the tests check argmax rather than position."""
    gh, gw = top.shape
    logits = np.zeros((k, gh, gw), np.float32)
    class_ids = np.zeros((k, gh, gw), np.int64)
    for i in range(gh):
        for j in range(gw):
            others = [c for c in range(num_classes) if c != top[i, j]][: k - 1]
            slot = (i + j) % k  # where the top-1 class sits in this cell
            ids = others[:slot] + [int(top[i, j])] + others[slot:]
            class_ids[:, i, j] = ids
            logits[:, i, j] = [3.0 if c == top[i, j] else -1.0 - 0.5 * n for n, c in enumerate(ids)]
    return logits, class_ids


def _png_ok(path):
    assert os.path.isfile(path)
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 50 and im.size[1] > 50


def test_cell_grid_hw_is_image_orientation():
    logits, class_ids = _hw_map()
    top_class, top_prob = cell_grid(class_ids, logits, "HW")
    assert top_class.shape == (2, 3)
    np.testing.assert_array_equal(top_class, TOP_IMAGE)
    assert top_prob.shape == (2, 3)
    assert np.all((top_prob > 0.5) & (top_prob <= 1.0))


def test_cell_grid_wh_transposes():
    logits, class_ids = _hw_map()
    # The same map read as WH is the transpose of the HW reading ...
    wh_class, wh_prob = cell_grid(class_ids, logits, "WH")
    hw_class, hw_prob = cell_grid(class_ids, logits, "HW")
    assert wh_class.shape == (3, 2)
    np.testing.assert_array_equal(wh_class, TOP_IMAGE.T)
    np.testing.assert_array_equal(wh_class, hw_class.T)
    np.testing.assert_allclose(wh_prob, hw_prob.T)
    # ... and a map stored transposed (WH, axis 1 along the image width) comes back image-oriented.
    stored_wh = (np.ascontiguousarray(logits.transpose(0, 2, 1)),
                 np.ascontiguousarray(class_ids.transpose(0, 2, 1)))
    assert stored_wh[0].shape == (3, 3, 2)
    top_class, _ = cell_grid(stored_wh[1], stored_wh[0], "WH")
    np.testing.assert_array_equal(top_class, TOP_IMAGE)


def test_cell_grid_probability_is_softmax_over_k():
    logits = np.array([[[2.0]], [[0.0]], [[-1.0]]], np.float16)
    class_ids = np.array([[[7]], [[3]], [[5]]])
    top_class, top_prob = cell_grid(class_ids, logits, "HW")
    expected = 1.0 / (1.0 + np.exp(-2.0) + np.exp(-3.0))
    assert top_class[0, 0] == 7
    assert top_prob[0, 0] == pytest.approx(expected, rel=1e-3)


def test_cell_grid_rejects_bad_input():
    logits, class_ids = _hw_map()
    with pytest.raises(ValueError, match="layout"):
        cell_grid(class_ids, logits, "HWC")
    with pytest.raises(ValueError):
        cell_grid(class_ids[:, :1], logits, "HW")


def test_class_mass_sums_to_one_and_is_sorted():
    logits, class_ids = _hw_map()
    classes, mass = class_mass(class_ids, logits)
    assert mass.sum() == pytest.approx(1.0)
    assert np.all(np.diff(mass) <= 1e-12)
    assert set(classes.tolist()) == set(np.unique(class_ids).tolist())


@pytest.mark.parametrize("both", [False, True])
def test_render_label_map_writes_png(tmp_path, both):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    logits, class_ids = _hw_map()
    names = [f"a rather long class name {i}" for i in range(9)]
    out = tmp_path / "sub" / "map.png"
    fig = render_label_map(image, logits.astype(np.float16), class_ids, names, layout="WH",
                           out_path=out, title="test", top=3, both_layouts=both)
    assert len(fig.axes) == (3 if both else 2)  # panels + side panel
    _png_ok(out)


def test_render_large_grid_without_text(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    top = rng.integers(0, 9, (24, 24))
    logits, class_ids = _hw_map(top, k=2)
    fig = render_label_map(image, logits, class_ids, None, out_path=tmp_path / "big.png", top=0)
    assert len(fig.axes) == 1
    assert not fig.axes[0].texts  # grids larger than 20 get no per-cell names
    _png_ok(tmp_path / "big.png")


@pytest.fixture
def small_store(tmp_path):
    root = tmp_path / "images"
    (root / "cls").mkdir(parents=True)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB").save(
        root / "cls" / "a.JPEG", format="JPEG", quality=90)
    # row 1's image is never written: it is the missing one
    logits, class_ids = _hw_map()
    logits = np.stack([logits, logits[:, ::-1]]).astype(np.float16)
    class_ids = np.stack([class_ids, class_ids[:, ::-1]])
    names = [f"class number {i}" for i in range(9)]
    path = write_store(tmp_path / "maps.h5", ["cls/a.JPEG", "cls/missing.JPEG"], logits, class_ids,
                       9, class_names=names, layout="WH", labels=[4, -1])
    return path, root


def test_show_store_row_writes_png(small_store, tmp_path):
    path, root = small_store
    with LabelStore(path) as store:
        out = show_store_row(store, 0, root, tmp_path / "row0.png")
        assert os.fspath(out) == os.fspath(tmp_path / "row0.png")
        _png_ok(out)
        both = show_store_row(store, 0, root, tmp_path / "row0_both.png", layout="HW",
                              both_layouts=True)
        _png_ok(both)
    # a store path is accepted too
    _png_ok(show_store_row(path, 0, root, tmp_path / "row0_path.png"))


def test_show_store_row_missing_image(small_store, tmp_path):
    path, root = small_store
    with LabelStore(path) as store:
        with pytest.raises(FileNotFoundError, match="missing.JPEG"):
            show_store_row(store, 1, root, tmp_path / "row1.png")
        with pytest.raises(FileNotFoundError, match="a.JPEG"):
            show_store_row(store, 0, tmp_path / "no_such_root", tmp_path / "row0.png")
    assert not (tmp_path / "row1.png").exists()


@pytest.mark.parametrize("index", [2, 100, -1])
def test_show_store_row_bad_index(small_store, tmp_path, index):
    path, root = small_store
    with LabelStore(path) as store:
        with pytest.raises(IndexError):
            show_store_row(store, index, root, tmp_path / "bad.png")


def test_show_store_row_bad_layout(small_store, tmp_path):
    path, root = small_store
    with LabelStore(path) as store:
        with pytest.raises(ValueError, match="layout"):
            show_store_row(store, 0, root, tmp_path / "bad.png", layout="XY")


def test_show_never_reads_outside_the_image_root(small_store, tmp_path):
    """`dali-relabel show` opens the store checking its header only: a path edited to climb out of the
    image root must still be refused before any file is read."""
    import h5py

    from dali_relabel.paths import UnsafePathError

    path, root = small_store
    secret = tmp_path / "secret.JPEG"
    secret.write_bytes(b"not for you")
    with h5py.File(path, "r+") as f:
        start = int(f["path_offsets"][0])
        f["path_bytes"][start:start + 3] = np.frombuffer(b"../", np.uint8)
    with LabelStore(path, verify="header") as store:
        with pytest.raises(UnsafePathError, match="'..' leaves the image root"):
            show_store_row(store, 0, root, tmp_path / "leak.png")
    assert not (tmp_path / "leak.png").exists()
