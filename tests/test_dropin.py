"""The loaders as training scripts use a ``torch.utils.data.DataLoader``: passes, epochs, attributes,
state, devices, dtypes and the data settings timm and torchvision pass; crops keyed by row."""
import pytest
import torch

from dali_relabel.config import DataConfig

pytest.importorskip("nvidia.dali")

SMALL = dict(image_size=16, num_threads=1, seed=5)


@pytest.fixture
def textured(tiny_set):
    """Random-texture JPEGs of different sizes (crops change the pixels) and a random store."""
    return tiny_set.images, tiny_set.store


def _loader(textured, batch_size=4, **config):
    from dali_relabel.loader import ReLabelLoader

    image_root, store = textured
    return ReLabelLoader(image_root, store, batch_size=batch_size, config=DataConfig(**{**SMALL, **config}),
                         device="cpu", return_rows=True)


def _rows(batches):
    return [rows.tolist() for _, _, rows in batches]


# -- passes and epochs ---------------------------------------------------------------------------
@pytest.mark.slow
def test_every_iter_is_a_full_pass_after_a_peek_or_a_break(textured):
    loader = _loader(textured)
    assert len(loader) == 6
    next(iter(loader))  # peek
    assert len(list(loader)) == 6
    for i, _ in enumerate(loader):
        if i == 2:
            break
    passes = [_rows(loader) for _ in range(2)]
    assert [len(p) for p in passes] == [6, 6]
    for rows in passes:
        assert sorted(r for batch in rows for r in batch) == list(range(24))
    assert passes[0] != passes[1], "a new pass draws a new order"


@pytest.mark.slow
def test_set_epoch_chooses_the_order_like_a_distributed_sampler(textured):
    a, b = _loader(textured), _loader(textured)
    a.sampler.set_epoch(7)  # timm and torchvision call it on loader.sampler
    b.set_epoch(7)
    first = _rows(a)
    assert first == _rows(b)
    a.sampler.set_epoch(7)
    assert _rows(a) == first, "the same epoch gives the same order"
    a.set_epoch(8)
    assert _rows(a) != first
    b.set_epoch(7)
    assert list(b.sampler) == [r for batch in first for r in batch], "the sampler yields the pass's rows"
    assert len(b.sampler) == 24


@pytest.mark.slow
def test_dataloader_attributes(textured):
    loader = _loader(textured, batch_size=5)
    assert len(loader.dataset) == 24 and loader.batch_size == 5
    assert loader.dataset.classes[:4] == [f"class_{c:02d}" for c in range(4)]
    assert loader.dataset.class_to_idx["class_02"] == 2
    assert loader.drop_last is True and loader.batch_sampler is None
    assert len(loader) == 4 and len(loader.sampler) == 24
    assert loader.mixup_enabled is True


@pytest.mark.slow
def test_validation_covers_every_image_once_after_a_peek_on_two_ranks(textured):
    from dali_relabel.loader import ValidationLoader

    image_root, _ = textured
    loaders = [ValidationLoader(image_root, 5, config=DataConfig(**SMALL), device="cpu", rank=r, world_size=2,
                                return_rows=True) for r in range(2)]
    next(iter(loaders[0]))
    seen = [row for loader in loaders for _, _, rows in loader for row in rows.tolist()]
    assert sorted(seen) == list(range(24))
    assert len(loaders[0].dataset) == 24 and loaders[0].drop_last is False


# -- state -----------------------------------------------------------------------------------------
def _batches_with_pixels(loader):
    return [(rows.tolist(), images.clone(), targets.clone()) for images, targets, rows in loader]


@pytest.mark.slow
def test_resume_gives_the_same_rows_crops_and_targets(textured):
    reference = _loader(textured)
    reference.set_epoch(3)
    full = _batches_with_pixels(reference)
    interrupted = _loader(textured)
    interrupted.set_epoch(3)
    for i, _ in enumerate(interrupted):
        if i == 1:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["batch"]) == (3, 2)
    resumed = _loader(textured, num_threads=2)  # other threads: crops must not depend on them
    resumed.load_state_dict(state)
    rest = _batches_with_pixels(resumed)
    assert len(rest) == len(full) - 2
    for (rows_a, images_a, targets_a), (rows_b, images_b, targets_b) in zip(full[2:], rest):
        assert rows_a == rows_b
        torch.testing.assert_close(images_a, images_b, rtol=0, atol=0)
        torch.testing.assert_close(targets_a, targets_b, rtol=0, atol=0)
    assert resumed.state_dict()["epoch"] == 4 and resumed.state_dict()["batch"] == 0


@pytest.mark.slow
def test_state_at_the_end_of_an_epoch_is_the_next_epoch(textured):
    loader = _loader(textured)
    for _ in loader:
        pass
    assert (loader.state_dict()["epoch"], loader.state_dict()["batch"]) == (1, 0)
    other = _loader(textured)
    other.load_state_dict(dict(loader.state_dict(), epoch=0, batch=6))  # saved after the last batch
    assert (other.state_dict()["epoch"], other.state_dict()["batch"]) == (1, 0) and len(other) == 6


def _state_after(loader, batches):
    for i, _ in enumerate(loader):
        if i == batches - 1:
            break
    return loader.state_dict()


@pytest.mark.slow
def test_resume_with_other_data_inside_an_epoch_is_refused_naming_it(textured):
    """Issue 23, defect 5: another store, image size, layout or targets kind used to resume silently."""
    from dali_relabel.loader import ReLabelLoader
    from dali_relabel.loader_state import ResumeError

    state = _state_after(_loader(textured), 2)
    for config, named in ((dict(seed=6), "seed: saved 5, now 6"), (dict(image_size=24), "data.image_size: saved 16"),
                          (dict(layout="WH"), "data.layout: saved 'HW', now 'WH'"),
                          (dict(color_jitter=0.4), "data.color_jitter")):
        with pytest.raises(ResumeError, match=named):
            _loader(textured, **config).load_state_dict(state)
    image_root, _ = textured
    original = ReLabelLoader(image_root, None, 4, config=DataConfig(**SMALL), device="cpu")
    with pytest.raises(ResumeError, match=r"data.targets: saved 'relabel', now 'original'.*restart_epoch=True"):
        original.load_state_dict(state)
    original.load_state_dict(state, restart_epoch=True)
    assert (original.epoch, len(original)) == (0, 6)
    _loader(textured, num_threads=3, prefetch_queue_depth=1).load_state_dict(state)  # execution settings: fine
    _loader(textured, image_size=24).load_state_dict(dict(state, epoch=1, batch=0, position=0))  # a boundary


@pytest.mark.slow
def test_resume_on_other_ranks_and_batch_size_reads_the_rest_once_with_the_same_targets(textured):
    """Two ranks stop after 2 batches of 4; one rank with batches of 5 reads the rest of the epoch:
    every image once, each with the crop and target the uninterrupted run gave it."""
    from dali_relabel.loader import ReLabelLoader

    image_root, store = textured

    def loader(batch_size, rank=0, world_size=1):
        return ReLabelLoader(image_root, store, batch_size, config=DataConfig(**SMALL), device="cpu",
                             rank=rank, world_size=world_size, return_rows=True)

    reference = {}
    for images, targets, rows in loader(4):
        reference.update({r: (i, t) for r, i, t in zip(rows.tolist(), images, targets)})
    ranks = [loader(4, r, 2) for r in range(2)]
    seen = []
    for rank in ranks:
        for i, (_, _, rows) in enumerate(rank):
            seen += rows.tolist()
            if i == 1:
                break
    state = ranks[1].state_dict()
    assert (state["position"], state["world_size"]) == (16, 2)
    resumed = loader(5)
    resumed.load_state_dict(state)
    assert len(resumed) == 1  # 8 left: "drop" keeps one full batch of 5
    rest = [(rows.tolist(), images, targets) for images, targets, rows in resumed]
    seen += [r for rows, _, _ in rest for r in rows]
    assert len(seen) == len(set(seen)) and len(seen) >= 16 + 5
    for rows, images, targets in rest:
        for row, image, target in zip(rows, images, targets):
            torch.testing.assert_close(image, reference[row][0], rtol=0, atol=0)
            torch.testing.assert_close(target, reference[row][1], rtol=0, atol=0)


@pytest.mark.slow
def test_crops_depend_on_the_row_not_on_batch_or_threads(textured):
    a = {r: img for imgs, _, rows in _loader(textured, batch_size=4) for r, img in zip(rows.tolist(), imgs)}
    b = {r: img for imgs, _, rows in _loader(textured, batch_size=6, num_threads=3) for r, img in zip(rows.tolist(), imgs)}
    assert a.keys() == b.keys()
    for row in a:
        torch.testing.assert_close(a[row], b[row], rtol=0, atol=0)


# -- devices and dtypes ----------------------------------------------------------------------------
def test_devices_as_pytorch_takes_them():
    from dali_relabel.devices import device_index, resolve_device

    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == "cpu"
    assert device_index("cpu") is None
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1", torch.device("cuda", 0), "gpu"):
            with pytest.raises(RuntimeError, match="no CUDA GPU"):
                resolve_device(device)
    with pytest.raises(ValueError):
        resolve_device("meta")
    with pytest.raises(RuntimeError):
        resolve_device("tpu")


@pytest.mark.gpu
def test_cuda_index_is_taken_from_the_device():
    from dali_relabel.devices import device_index

    assert device_index("cuda:0") == 0 and device_index(torch.device("cuda", 0)) == 0
    assert device_index("cuda", device_id=0) == 0


@pytest.mark.slow
def test_bfloat16_channels_last_images(textured):
    images, targets, _ = next(iter(_loader(textured, output_dtype="bfloat16", channels_last=True)))
    assert images.dtype == torch.bfloat16 and images.shape == (4, 3, 16, 16)
    assert images.is_contiguous(memory_format=torch.channels_last)
    reference, _, _ = next(iter(_loader(textured)))
    torch.testing.assert_close(images.float(), reference, rtol=1e-2, atol=2e-2)


# -- settings scripts pass ---------------------------------------------------------------------------
@pytest.mark.slow
def test_interpolation_choices_change_the_pixels(textured):
    bilinear, _, rows = next(iter(_loader(textured)))
    bicubic, _, rows_b = next(iter(_loader(textured, interpolation="bicubic")))
    random_, _, _ = next(iter(_loader(textured, interpolation="random")))
    assert rows.tolist() == rows_b.tolist()
    assert not torch.equal(bilinear, bicubic)
    for image in random_:  # every sample is either its bilinear or its bicubic crop
        matches = [torch.equal(image, other) for other in (*bilinear, *bicubic)]
        assert sum(matches) >= 1


@pytest.mark.slow
def test_label_smoothing_on_soft_targets(textured):
    _, plain, _ = next(iter(_loader(textured)))
    _, smooth, _ = next(iter(_loader(textured, label_smoothing=0.1)))
    classes = plain.shape[1]
    torch.testing.assert_close(smooth, plain * 0.9 + 0.1 / classes)
    torch.testing.assert_close(smooth.sum(1), torch.ones(len(smooth)))


@pytest.mark.slow
def test_color_jitter_is_keyed_and_changes_pixels(textured):
    plain, _, _ = next(iter(_loader(textured)))
    jittered, _, _ = next(iter(_loader(textured, color_jitter=0.4)))
    again, _, _ = next(iter(_loader(textured, color_jitter=(0.4, 0.4, 0.4))))
    assert not torch.equal(plain, jittered)
    torch.testing.assert_close(jittered, again, rtol=0, atol=0)


@pytest.mark.slow
def test_mixup_enabled_switches_mixing_off_for_the_next_pass(textured):
    plain = _batches_with_pixels(_loader(textured))
    mixed = _loader(textured, cutmix_probability=1.0, mixup_alpha=1.0)
    first = _batches_with_pixels(mixed)
    assert not torch.equal(first[0][1], plain[0][1]), "CutMix/Mixup should change the pixels"
    mixed.mixup_enabled = False  # what timm does at --mixup-off-epoch
    mixed.set_epoch(0)
    off = _batches_with_pixels(mixed)
    for (rows_a, images_a, targets_a), (rows_b, images_b, targets_b) in zip(plain, off):
        assert rows_a == rows_b
        torch.testing.assert_close(images_a, images_b, rtol=0, atol=0)
        torch.testing.assert_close(targets_a, targets_b, rtol=0, atol=0)


def test_validation_resize_follows_crop_pct(textured):
    assert DataConfig(image_size=224).resize_size == 256
    assert DataConfig(image_size=224, crop_pct=0.95).resize_size == 235
    assert DataConfig(image_size=224, crop_pct=0.95, val_resize=232).resize_size == 232


def test_mean_and_std_are_in_zero_one_units():
    with pytest.raises(ValueError, match="0-1 units"):
        DataConfig(mean=(123.7, 116.3, 103.5))
    assert DataConfig().mean == (0.485, 0.456, 0.406)
