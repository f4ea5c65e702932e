"""`dali-relabel generate --regions R`: keyed crops, the teacher's top-k on exactly each crop, the
region store it writes, resume, ranks, CLI, bad settings.

Everything runs on the CPU over a tiny ImageFolder of smooth PNGs of different sizes (PNG: DALI and
PIL decode them to the same pixels, so what differs between the two crop paths is the resize alone).
The teacher is a toy: every crop average-pooled to 4 x 4, then a fixed random linear layer (a model
no dense-map family covers: its output width is checked on the first batch), scaled so that its
softmax is far from uniform and differs from crop to crop and between a crop and its mirror image.
"""
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dali_relabel.config import DataConfig
from dali_relabel.crops import crop_window, sample_keys
from dali_relabel.imagefolder import list_images
from dali_relabel.store import RegionStore, RegionWriter
from dali_relabel.tools.generate import GenerateError, merge_parts, part_path
from dali_relabel.tools.generate_regions import DEFAULT_RATIO, DEFAULT_SCALE, generate_region_labels
from generate_helpers import (copy_files, interrupt_second_write, one_torch_thread,  # noqa: F401 (autouse)
                              record_write_starts, smooth_image_tree)

pytest.importorskip("nvidia.dali")

SIZE, R, K, BATCH, CLASSES = 24, 4, 3, 5, 6
CONFIG = DataConfig(num_threads=1)
IMAGE_SIZES = [(48, 64), (64, 48), (40, 56), (56, 72)]
# PIL's and DALI's antialiased bicubic resizes of the same smooth crop differ by about a grey level;
# through the toy teacher that moves a probability by at most 0.003 (float16 storage: 5e-4 more).
PROB_TOLERANCE = 0.01


class ToyTeacher(torch.nn.Module):
    """``[N, 3, S, S]`` -> ``[N, C]``: 4 x 4 average pooling, then a fixed random linear layer."""

    def __init__(self, num_classes=CLASSES, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(48, num_classes)
        with torch.no_grad():
            self.linear.weight.mul_(3.0)

    def forward(self, x):
        return self.linear(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    image_root = str(root / "images")
    sizes = smooth_image_tree(image_root, CLASSES, 2, IMAGE_SIZES, ext="png")
    return dict(root=root, images=image_root, sizes=sizes)


def _generate(data, out, model=None, **kwargs):
    args = dict(regions=R, size=SIZE, k=K, batch_size=BATCH, crop_batch=7, device="cpu", config=CONFIG,
                progress=False, teacher_name="toy", seed=3)
    args.update(kwargs)
    return generate_region_labels(data["images"], str(out), model if model is not None else ToyTeacher(), **args)


@pytest.fixture(scope="module")
def store_path(data):
    return _generate(data, data["root"] / "single.h5")


def _sha(path):
    with RegionStore(path) as store:
        return store.header.content_sha256


# --------------------------------------------------------------------------------------------------
# What is stored


@pytest.mark.slow
def test_store_header_rows_labels_and_sizes(data, store_path):
    images = list_images(data["images"])
    with RegionStore(store_path, verify="full") as store:
        h = store.header
        assert (h.num_rows, h.num_classes, h.regions, h.k, h.label_type) == (12, CLASSES, R, K, "marginal_smoothing")
        assert (h.teacher, h.teacher_input_size, h.source) == ("toy", SIZE, "generate")
        assert store.paths.tolist() == images.relpaths
        assert store.labels.tolist() == images.labels
        assert store.image_sizes.tolist() == [list(s) for s in data["sizes"]]
        crops = store.read(np.arange(12))
        assert crops.values.dtype == np.float16
        assert (np.diff(crops.values.astype(np.float32), axis=-1) <= 0).all(), "top-k not in descending order"
    leftovers = [f for f in os.listdir(data["root"]) if f.startswith("single.h5") and f != "single.h5"]
    assert not leftovers


@pytest.mark.slow
def test_every_box_and_flip_is_the_keyed_draw(data, store_path):
    with RegionStore(store_path) as store:
        crops = store.read(np.arange(len(store)))
        sizes = store.image_sizes
    for row, (height, width) in enumerate(sizes):
        for j in range(R):
            key = int(sample_keys(3, j, [row])[0])
            y, x, h, w, mirror = crop_window(int(height), int(width), key, DEFAULT_SCALE, DEFAULT_RATIO, 10, 0.5)
            assert crops.boxes[row, j].tolist() == [x, y, w, h], (row, j)
            assert crops.flips[row, j] == mirror, (row, j)
    assert 0 < crops.flips.mean() < 1
    assert len({tuple(b) for b in crops.boxes.reshape(-1, 4).tolist()}) == crops.boxes.shape[0] * R


def _pil_probabilities(data, store, model):
    """The toy teacher's softmax on every stored crop, cut from the image with PIL: the stored box,
    bicubic (antialiased) to SIZE x SIZE, mirrored as stored, the ImageNet mean/std. ``[N, R, C]``."""
    crops = store.read(np.arange(len(store)))
    mean = 255 * torch.tensor(CONFIG.mean).view(1, 3, 1, 1)
    std = 255 * torch.tensor(CONFIG.std).view(1, 3, 1, 1)
    batch = []
    for row, rel in enumerate(store.paths.tolist()):
        with Image.open(os.path.join(data["images"], rel)) as image:
            image = image.convert("RGB")
            for (x, y, w, h), flip in zip(crops.boxes[row].tolist(), crops.flips[row]):
                crop = image.crop((x, y, x + w, y + h)).resize((SIZE, SIZE), Image.BICUBIC)
                if flip:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                batch.append(torch.from_numpy(np.asarray(crop, np.float32)).permute(2, 0, 1))
    with torch.no_grad():
        probabilities = torch.softmax(model((torch.stack(batch) - mean) / std), dim=1)
    return probabilities.reshape(len(store), R, -1).numpy(), crops


@pytest.mark.slow
def test_stored_labels_are_the_teachers_on_exactly_that_crop(data, store_path):
    with RegionStore(store_path) as store:
        expected, crops = _pil_probabilities(data, store, ToyTeacher())
    ids = crops.class_ids.astype(np.int64)
    values = crops.values.astype(np.float32)
    np.testing.assert_allclose(values, np.take_along_axis(expected, ids, axis=-1), atol=PROB_TOLERANCE)
    # the stored classes are the top-k wherever the k-th and the next class are told apart
    ordered = -np.sort(-expected, axis=-1)
    clear = ordered[..., K - 1] - ordered[..., K] > 2 * PROB_TOLERANCE
    assert clear.mean() > 0.5
    best = np.sort(np.argsort(-expected, axis=-1)[..., :K], axis=-1)
    assert np.array_equal(best[clear], np.sort(ids, axis=-1)[clear])
    # each stored crop a is nearer its own crop than any other crop b of the image the teacher tells apart
    n = len(ids)
    at_ids = np.take_along_axis(np.broadcast_to(expected[:, None], (n, R, R, CLASSES)),
                                np.broadcast_to(ids[:, :, None], (n, R, R, K)), axis=-1)  # [n, a, b, k]
    distance = np.abs(values[:, :, None] - at_ids).max(-1)
    apart = np.abs(expected[:, :, None] - expected[:, None]).max(-1) > 4 * PROB_TOLERANCE  # [n, a, b]
    assert apart.sum() > 0.8 * n * R * (R - 1), "crops of one image too alike to tell apart"
    own = np.diagonal(distance, axis1=1, axis2=2)[:, :, None]
    assert (own < distance)[apart].all()


@pytest.mark.slow
def test_mirrored_crops_are_labelled_mirrored(data, store_path, tmp_path):
    """The same store made without flips differs exactly where a crop was flipped."""
    unflipped = _generate(data, tmp_path / "noflip.h5", flip_probability=0.0)
    with RegionStore(store_path) as flipped, RegionStore(unflipped) as plain:
        a, b = flipped.read(np.arange(12)), plain.read(np.arange(12))
    assert np.array_equal(a.boxes, b.boxes) and not b.flips.any()
    same = (np.abs(a.values.astype(np.float32) - b.values.astype(np.float32)).max(-1) < 1e-3) & \
        (a.class_ids == b.class_ids).all(-1)
    assert same[a.flips == 0].all()
    assert not same[a.flips == 1].any()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("amp", [False, True])
def test_the_gpu_path_stores_the_same_crops_and_labels(data, store_path, tmp_path, amp):
    """Decoded by the ``mixed`` decoder, cut and resized on the GPU, labelled there (channels_last,
    with or without AMP): the same boxes and flips, the same labels within the resize tolerance."""
    path = _generate(data, tmp_path / "gpu.h5", device="gpu", amp=amp)
    with RegionStore(path, verify="full") as gpu, RegionStore(store_path) as cpu:
        a, b = gpu.read(np.arange(12)), cpu.read(np.arange(12))
        assert np.array_equal(gpu.image_sizes, cpu.image_sizes)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.flips, b.flips)
    # the k largest probabilities, in order (near ties may swap their classes)
    np.testing.assert_allclose(a.values.astype(np.float32), b.values.astype(np.float32), atol=2 * PROB_TOLERANCE)
    assert (a.class_ids[..., 0] == b.class_ids[..., 0]).mean() > 0.9


# --------------------------------------------------------------------------------------------------
# Resume, ranks


@pytest.fixture(scope="module")
def interrupted(data, tmp_path_factory):
    """The partial files of a run stopped by an error in its second write (rows 0..4 written)."""
    folder = tmp_path_factory.mktemp("interrupted")
    interrupt_second_write(folder, "resumed.h5", RegionWriter, lambda out: _generate(data, out))
    return folder


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_store(data, store_path, interrupted, tmp_path, monkeypatch):
    out = copy_files(interrupted, tmp_path, "resumed.h5")
    starts = record_write_starts(monkeypatch, RegionWriter)
    _generate(data, out)
    assert starts == [5, 10], "rows already written were written again"
    assert _sha(out) == _sha(store_path)
    assert sorted(os.listdir(tmp_path)) == ["resumed.h5"]


@pytest.mark.slow
def test_resume_with_another_batch_size_writes_only_missing_rows(data, store_path, interrupted, tmp_path,
                                                                 monkeypatch):
    out = copy_files(interrupted, tmp_path, "resumed.h5")
    starts = record_write_starts(monkeypatch, RegionWriter)
    _generate(data, out, batch_size=4)  # restarts at row 4 (a batch boundary), writes from row 5
    assert starts == [5, 8]
    with RegionStore(out) as resumed, RegionStore(store_path) as single:
        a, b = resumed.read(np.arange(12)), single.read(np.arange(12))
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.flips, b.flips)
    np.testing.assert_allclose(a.values.astype(np.float32), b.values.astype(np.float32), atol=1e-3)


@pytest.mark.slow
def test_a_partial_store_of_other_crops_is_started_again(data, store_path, interrupted, tmp_path, monkeypatch):
    out = copy_files(interrupted, tmp_path, "resumed.h5")
    starts = record_write_starts(monkeypatch, RegionWriter)
    with pytest.warns(UserWarning, match="other settings"):
        _generate(data, out, seed=4)
    assert starts == [0, 5, 10]
    assert _sha(out) != _sha(store_path)


@pytest.mark.slow
def test_two_ranks_and_a_merge_equal_one_process(data, tmp_path):
    single = _generate(data, tmp_path / "single3.h5", batch_size=3)  # the ranks' batches: the same images
    out = tmp_path / "ranks.h5"
    parts = [_generate(data, out, batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert parts == [part_path(out, 0, 2), part_path(out, 1, 2)]
    with RegionStore(parts[1]) as part:
        assert part.paths.tolist() == list_images(data["images"]).relpaths[6:]
    assert merge_parts(out, 2) == str(out)
    assert _sha(out) == _sha(single)
    assert sorted(os.listdir(tmp_path)) == ["ranks.h5", "single3.h5"]


# --------------------------------------------------------------------------------------------------
# Bad settings, CLI


def test_a_teacher_with_other_outputs_is_refused_before_reading(data, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(GenerateError, match="the teacher has 4 outputs but .* gives 6 classes"):
        _generate(data, tmp_path / "x.h5", model=torchvision.models.resnet18(num_classes=4))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(regions=0), "regions=0 must be at least 1"),
    (dict(k=7), r"k=7 must lie in \[1, 6\]"),
    (dict(scale=(0.5, 0.2)), r"crop scale must satisfy 0 < lo <= hi <= 1 .* got \(0.5, 0.2\)"),
    (dict(ratio=(2.0, 1.0)), "crop ratio must satisfy"),
    (dict(flip_probability=1.5), "flip_probability=1.5"),
    (dict(interpolation="cubic"), "interpolation 'cubic' is not one of"),
    (dict(crop_batch=0), "size and crop_batch must be positive"),
])
def test_bad_settings_get_clear_errors(data, tmp_path, change, message):
    with pytest.raises(GenerateError, match=message):
        _generate(data, tmp_path / "x.h5", **change)
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_a_teacher_of_another_width_is_refused_at_the_first_batch(data, tmp_path):
    with pytest.raises(GenerateError, match=r"logits of shape \(7, 5\) for 7 crops; expected \[7, 6\]"):
        _generate(data, tmp_path / "x.h5", model=ToyTeacher(num_classes=5))


@pytest.mark.slow
def test_cli_generate_regions_end_to_end(data, tmp_path, capsys):
    from dali_relabel.tools.cli import main

    weights = tmp_path / "resnet18.pt"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    torch.save(model.state_dict(), weights)
    out = str(tmp_path / "cli.h5")
    code = main(["generate", "--images", data["images"], "--out", out, "--model", "resnet18",
                 "--weights", str(weights), "--size", "32", "--regions", "2", "--region-scale", "0.2", "0.9",
                 "--region-seed", "3", "--k", "2", "--device", "cpu", "--threads", "1", "--quiet"])
    assert code == 0
    assert "wrote 12 rows" in capsys.readouterr().out
    reference = _generate(data, tmp_path / "api.h5", model=model, regions=2, size=32, k=2, scale=(0.2, 0.9),
                          batch_size=None, crop_batch=256, teacher_name="resnet18")
    assert _sha(out) == _sha(reference)


@pytest.mark.parametrize("flags, message", [
    (["--grid", "7", "--regions", "2"], "--grid is for label maps"),
    (["--region-scale", "0.2", "0.9"], "--region-scale only apply with --regions"),
    (["--regions", "2", "--region-scale", "0.9", "0.2"], "crop scale must satisfy"),
])
def test_cli_bad_region_settings(data, tmp_path, capsys, flags, message):
    from dali_relabel.tools.cli import main

    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), weights)
    code = main(["generate", "--images", data["images"], "--out", str(tmp_path / "x.h5"), "--model", "resnet18",
                 "--weights", str(weights), "--device", "cpu", "--quiet"] + flags)
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["resnet18.pt"]
