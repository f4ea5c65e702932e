"""Images as they occur in real ImageNet: decoded where possible, otherwise a clear error or a count."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.config import DataConfig
from dali_relabel.bad_images import BadImageError, check_encoded_image
from dali_relabel.store import write_store

pytest.importorskip("nvidia.dali")


def _jpeg_bytes(mode="RGB", fmt="JPEG", size=(48, 40), colour=(200, 60, 30)):
    image = Image.new("RGB", size, colour).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def make_tree(root, files):
    """An image tree from ``{relpath: bytes}`` plus a store with one flat map per image."""
    image_root = os.path.join(root, "images")
    for relpath, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(image_root, relpath)), exist_ok=True)
        with open(os.path.join(image_root, relpath), "wb") as f:
            f.write(data)
    paths = sorted(files)
    n = len(paths)
    logits = np.full((n, 1, 2, 2), 5.0, np.float16)
    ids = np.zeros((n, 1, 2, 2), np.int64)
    store = os.path.join(root, "store.h5")
    write_store(store, paths, logits, ids, 2, class_names=["a", "b"], labels=[0] * n)
    return image_root, store


def _loader(image_root, store, batch_size, **kwargs):
    from dali_relabel.loader import ReLabelLoader

    config = DataConfig(image_size=16, num_threads=1, last_batch="pad", seed=1)
    return ReLabelLoader(image_root, store, batch_size=batch_size, config=config, device="cpu",
                         return_rows=True, shuffle=False, **kwargs)


@pytest.mark.slow
def test_cmyk_grayscale_and_disguised_png_decode_as_rgb(tmp_path):
    image_root, store = make_tree(str(tmp_path), {
        "a/0_rgb.JPEG": _jpeg_bytes(),
        "a/1_cmyk.JPEG": _jpeg_bytes(mode="CMYK"),
        "a/2_gray.JPEG": _jpeg_bytes(mode="L"),
        "a/3_png.JPEG": _jpeg_bytes(fmt="PNG"),
    })
    images, targets, rows = next(iter(_loader(image_root, store, 4)))
    assert images.shape == (4, 3, 16, 16) and rows.tolist() == [0, 1, 2, 3]
    config = DataConfig()
    rgb = images.mean(dim=(2, 3)) * (255 * torch.tensor(config.std)).view(1, 3) + (255 * torch.tensor(config.mean)).view(1, 3)
    for row in (0, 1, 3):  # colour images keep their colour, whatever the container
        assert torch.allclose(rgb[row], torch.tensor([200.0, 60.0, 30.0]), atol=12), rgb[row]
    assert abs(rgb[2, 0] - rgb[2, 1]) < 2 and abs(rgb[2, 1] - rgb[2, 2]) < 2  # gray stays gray
    assert rgb[2, 0] > 20, "a grayscale image decoded as black"


@pytest.mark.parametrize("name, data, message", [
    ("empty", b"", "empty file"),
    ("truncated", _jpeg_bytes()[:300], "truncated JPEG"),
    ("text", b"this is not an image at all" * 4, "not a recognised image format"),
    ("truncated_png", _jpeg_bytes(fmt="PNG")[:-20], "truncated PNG"),
])
def test_structural_check_names_the_problem(name, data, message):
    with pytest.raises(BadImageError, match=f"{name}.JPEG: {message}"):
        check_encoded_image(np.frombuffer(data, np.uint8), f"{name}.JPEG")


@pytest.mark.slow
def test_truncated_jpeg_stops_the_loader_with_the_file_name(tmp_path):
    image_root, store = make_tree(str(tmp_path), {
        "a/0.JPEG": _jpeg_bytes(), "a/1_bad.JPEG": _jpeg_bytes()[:200], "a/2.JPEG": _jpeg_bytes(),
        "a/3.JPEG": _jpeg_bytes()})
    with pytest.raises(BadImageError, match=r"1_bad.JPEG: truncated JPEG"):
        for _ in _loader(image_root, store, 2):
            pass


@pytest.mark.slow
def test_skip_bad_images_replaces_and_counts_them(tmp_path):
    image_root, store = make_tree(str(tmp_path), {
        "a/0.JPEG": _jpeg_bytes(), "a/1_bad.JPEG": _jpeg_bytes()[:200], "a/2.JPEG": _jpeg_bytes(),
        "a/3_bad.JPEG": b"", "a/4.JPEG": _jpeg_bytes(), "a/5.JPEG": _jpeg_bytes()})
    loader = _loader(image_root, store, 3, skip_bad_images=True)
    rows = torch.cat([batch_rows for _, _, batch_rows in loader]).tolist()
    assert rows == [0, 2, 4, 5], "bad images must be left out, and nothing else"
    assert loader.skipped_images == 2


@pytest.mark.slow
def test_jpeg_corrupt_inside_is_named_after_decoder_failure(tmp_path):
    good = _jpeg_bytes(size=(64, 64))
    corrupt = good[:200] + bytes([7]) * 300 + good[500:]
    image_root, store = make_tree(str(tmp_path), {"a/0.JPEG": good, "a/1_corrupt.JPEG": corrupt})
    with pytest.raises(BadImageError, match=r"1_corrupt.JPEG: cannot be decoded"):
        for _ in _loader(image_root, store, 2):
            pass
