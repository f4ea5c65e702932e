"""Converting Token Labeling's release (LV-ViT, zihangJiang/TokenLabeling) into a store.

The files are written here the way their ``generate_label.py`` writes them: the teacher's dense
output per image ``[H, W, C]`` (channels last, as its head returns it), the top-k over classes, values
and indices both cast to float16, stacked ``[2, H, W, k]`` and permuted to ``[2, k, H, W]`` (saved as
that strided view), at ``<last folder>/<file name up to its first dot>.pt``. The teacher puts a peak
of class ``(3 i + j + row) % C`` at grid row ``i`` (image height) and column ``j`` (image width), a
pattern that is not symmetric, so reading the grid transposed fails the tests.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.ops.reference import grid_cell_box, reference_label_pooling
from dali_relabel.store import LabelStore
from dali_relabel.tools.convert import ConversionError, convert_release, load_release_map
from dali_relabel.tools.release_formats import (TOKEN_LABELING_TEACHER, TOKEN_LABELING_TEACHER_SIZE,
                                                relabel_map_relpath, token_labeling_map_relpath)

C, PER_CLASS, K, G = 9, 2, 5, 3  # classes (= class folders), images per class, top-k, grid side
SIDE = 48  # square images: a whole-image crop is then exactly the map's square
DOTTED = "class_04/n04_1.crop.v2.JPEG"  # their naming cuts at the first dot, ReLabel's at the last


def _image_relpaths():
    rels = [f"class_{c:02d}/n{c:02d}_{i}.JPEG" for c in range(C) for i in range(PER_CLASS)]
    return sorted(DOTTED if r == "class_04/n04_1.JPEG" else r for r in rels)


def expected_top1(row: int) -> np.ndarray:
    """``[G, G]``: the class the teacher saw at each grid cell (row i along the height, column j
    along the width) of image ``row``."""
    i, j = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    return (3 * i + j + row) % C


def teacher_outputs(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, G, G, C]`` float32: small noise plus a peak at :func:`expected_top1`."""
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, 1.0, size=(n, G, G, C)).astype(np.float32)
    for row in range(n):
        top = expected_top1(row)
        for i in range(G):
            for j in range(G):
                out[row, i, j, top[i, j]] += 10.0 + i + 0.5 * j  # a distinct value per cell as well
    return torch.from_numpy(out)


def their_file_name(image_path: str) -> str:
    """Their generator's naming, spelled out from the path as it does (not the module's function)."""
    return "/".join(image_path.split("/")[-2:]).split(".")[0] + ".pt"


def write_token_labeling_release(maps_dir, relpaths, outputs, k=K):
    """One file per image as their generator saves it; returns the tensors saved."""
    saved = []
    for rel, out in zip(relpaths, outputs):
        values, indices = out.topk(k, dim=-1)                          # [G, G, k] each
        tensor = torch.stack([values.half(), indices.half()]).permute(0, 3, 1, 2)  # [2, k, G, G]
        path = os.path.join(maps_dir, their_file_name(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(tensor, path)
        saved.append(tensor)
    return saved


@pytest.fixture
def release(tmp_path):
    images, maps = tmp_path / "images", tmp_path / "maps"
    relpaths = _image_relpaths()
    rng = np.random.default_rng(1)
    for rel in relpaths:
        os.makedirs(images / rel.split("/")[0], exist_ok=True)
        pixels = rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / rel, format="JPEG", quality=90)
    outputs = teacher_outputs(len(relpaths))
    saved = write_token_labeling_release(maps, relpaths, outputs)
    return dict(images=images, maps=maps, relpaths=relpaths, outputs=outputs, saved=saved, tmp=tmp_path)


def _convert(r, out_name="tl.h5", **kw):
    args = dict(num_classes=C, workers=2, progress=False, chunk_rows=4, release_format="token-labeling")
    args.update(kw)
    out = r["tmp"] / out_name
    return convert_release(r["maps"], r["images"], out, **args), out


def _check_store(store, r):
    h = store.header
    assert h.layout == "HW" and h.source == "token-labeling-release"
    assert (h.teacher, h.teacher_input_size) == (TOKEN_LABELING_TEACHER, TOKEN_LABELING_TEACHER_SIZE)
    assert (h.num_rows, h.num_classes, h.k, h.grid_h, h.grid_w) == (len(r["relpaths"]), C, K, G, G)
    assert store.paths.tolist() == r["relpaths"]
    np.testing.assert_array_equal(store.labels, [int(p[6:8]) for p in r["relpaths"]])
    np.testing.assert_array_equal(store.image_sizes, np.full((len(r["relpaths"]), 2), SIDE))
    for row, rel in enumerate(r["relpaths"]):
        got = store.read(row)
        on_disk = torch.load(os.path.join(r["maps"], their_file_name(rel)), weights_only=True)
        np.testing.assert_array_equal(got.logits, on_disk[0].numpy())
        np.testing.assert_array_equal(got.class_ids.astype(np.int64), on_disk[1].numpy().astype(np.int64))
        # and against the teacher: its top-k values (rounded to float16) and classes, k first
        values, indices = r["outputs"][row].topk(K, dim=-1)
        np.testing.assert_array_equal(got.logits, values.half().permute(2, 0, 1).numpy())
        np.testing.assert_array_equal(got.class_ids, indices.permute(2, 0, 1).numpy())
        assert (got.class_ids[0] == expected_top1(row)).all()


def _top1_per_cell(store, row, layout):
    got = store.read(row)
    logits, ids = torch.from_numpy(got.logits[None].astype(np.float32)), torch.from_numpy(np.array(got.class_ids[None]))
    top = np.zeros((G, G), np.int64)
    for i in range(G):
        for j in range(G):
            pooled = reference_label_pooling(logits, ids, grid_cell_box((i, j), (G, G)), C, layout=layout)
            top[i, j] = int(pooled.argmax(1))
    return top


# ------------------------------------------------------------------------------------- the files
def test_files_are_what_their_generator_saves(release):
    rel = release["relpaths"][3]
    path = os.path.join(release["maps"], "class_01", "n01_1.pt")
    assert rel == "class_01/n01_1.JPEG" and os.path.exists(path)
    tensor = torch.load(path, weights_only=True)
    assert tensor.dtype == torch.float16 and tuple(tensor.shape) == (2, K, G, G)
    assert not tensor.is_contiguous(), "their generator saves the permuted view"
    assert os.path.exists(os.path.join(release["maps"], "class_04", "n04_1.pt"))  # from the dotted name
    np.testing.assert_array_equal(tensor[1, 0].numpy(), expected_top1(3))


def test_naming_follows_their_generator():
    for rel in _image_relpaths() + ["c/sub/x.y.jpg", "n01440764/n01440764_10026.JPEG"]:
        assert token_labeling_map_relpath(rel) == their_file_name(rel)
    assert token_labeling_map_relpath("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026.pt"
    assert token_labeling_map_relpath(DOTTED) == "class_04/n04_1.pt"
    assert relabel_map_relpath(DOTTED) == "class_04/n04_1.crop.v2.pt"
    assert token_labeling_map_relpath("c/sub/x.y.jpg") == "sub/x.pt"


def test_load_release_map_reads_their_float16_view(release):
    logits, ids = load_release_map(os.path.join(release["maps"], "class_00", "n00_0.pt"), C)
    assert logits.dtype == np.float32 and ids.dtype == np.int64 and logits.shape == (K, G, G)
    np.testing.assert_array_equal(logits, release["saved"][0][0].float().numpy())
    np.testing.assert_array_equal(ids, release["saved"][0][1].long().numpy())


# ------------------------------------------------------------------------------- the conversions
@pytest.mark.slow
def test_api_conversion_keeps_every_value_and_marks_the_store_geometric(release):
    report, out = _convert(release)
    assert report.rows == len(release["relpaths"]) and report.images_without_map == []
    store = LabelStore(out)
    store.verify_checksum()
    _check_store(store, release)
    # the store's layout puts every teacher cell where the teacher saw it; the transposed reading
    # (the ReLabel release's WH) moves every off-diagonal cell
    for row in range(len(release["relpaths"])):
        np.testing.assert_array_equal(_top1_per_cell(store, row, store.header.layout), expected_top1(row))
        transposed = _top1_per_cell(store, row, "WH")
        np.testing.assert_array_equal(transposed, expected_top1(row).T)
        assert (transposed != expected_top1(row)).sum() == G * G - G


@pytest.mark.slow
def test_cli_conversion_writes_the_same_store(release, capsys):
    from dali_relabel.tools.cli import main

    _, api = _convert(release, "api.h5")
    out = release["tmp"] / "cli.h5"
    assert main(["convert", "--format", "token-labeling", "--maps", str(release["maps"]), "--images",
                 str(release["images"]), "--out", str(out), "--num-classes", str(C), "--workers", "2",
                 "--quiet"]) == 0
    assert f"wrote {len(release['relpaths'])} rows" in capsys.readouterr().out
    store = LabelStore(out)
    _check_store(store, release)
    assert store.header.content_sha256 == LabelStore(api).header.content_sha256


def test_the_relabel_naming_does_not_find_a_dotted_name(release):
    with pytest.raises(ConversionError, match="images have no map") as info:
        _convert(release, release_format="relabel")
    assert DOTTED in str(info.value) and "class_04/n04_1.pt" in str(info.value)


def test_two_images_with_one_file_name_are_refused(release):
    twin = "class_02/n02_0.second.JPEG"  # their naming gives it class_02/n02_0.pt, as n02_0.JPEG
    Image.new("RGB", (SIDE, SIDE)).save(release["images"] / twin, format="JPEG")
    with pytest.raises(ConversionError, match="both have the map class_02/n02_0.pt") as info:
        _convert(release)
    assert "class_02/n02_0.JPEG" in str(info.value) and twin in str(info.value)
    assert not os.path.exists(release["tmp"] / "tl.h5")


def test_float16_ids_are_refused_beyond_2049_classes(release):
    path = os.path.join(release["maps"], "class_00", "n00_0.pt")
    load_release_map(path, 2049)  # ids up to 2048 are exact in float16
    with pytest.raises(ConversionError, match=r"float16, which holds whole numbers exactly only up to 2048"):
        load_release_map(path, 2050)
    names = [f"class_{c:02d}" for c in range(C)] + [f"extra_{c}" for c in range(3000 - C)]
    with pytest.raises(ConversionError, match=re.escape(f"{path}: class ids are stored as float16")):
        _convert(release, num_classes=3000, class_names=names)


def test_a_file_saved_with_the_classes_last_is_refused(release):
    rel = release["relpaths"][0]
    path = os.path.join(release["maps"], their_file_name(rel))
    torch.save(release["saved"][0].permute(0, 2, 3, 1).contiguous(), path)  # [2, G, G, k], not moved
    with pytest.raises(ConversionError, match=r"maps are square, this one reads as k=3 on a 3x5 grid"):
        _convert(release)


# ---------------------------------------------------------------------------- token-level targets
@pytest.mark.slow
@pytest.mark.parametrize("flip, layout", [(0.0, None), (1.0, None), (0.0, "WH")],
                         ids=["store-layout", "flipped", "WH-override"])
def test_token_targets_follow_the_teacher_grid(release, flip, layout):
    """Whole-image crops of square images pooled to a G x G token grid: each token's target peaks
    at the class the teacher saw there, mirrored for flipped crops; DataConfig(layout="WH") (the
    reading Token Labeling's own trainer uses) transposes the grid."""
    pytest.importorskip("nvidia.dali")
    from dali_relabel.config import DataConfig
    from dali_relabel.loader import ReLabelLoader

    _, out = _convert(release, workers=1)
    config = DataConfig(image_size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=flip,
                        output_size=(G, G), layout=layout, py_num_workers=0, num_threads=1, seed=5)
    loader = ReLabelLoader(str(release["images"]), str(out), batch_size=6, config=config, device="cpu",
                           return_rows=True)
    seen = []
    for _, targets, rows in loader:
        assert targets.shape[1:] == (C, G, G)
        for target, row in zip(targets, rows.tolist()):
            want = expected_top1(row)
            want = want[:, ::-1] if flip else want.T if layout == "WH" else want
            np.testing.assert_array_equal(target.argmax(0).numpy(), want, err_msg=f"row {row}")
            seen.append(row)
    assert sorted(seen) == list(range(len(release["relpaths"])))
