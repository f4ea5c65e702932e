"""What timm's ``train.py`` and torchvision's ``references/classification/train.py`` do with a loader,
emulated line for line without importing either script, so a loader that breaks their assumptions
fails here: timm's ``_set_loader_epoch``, its ``len(loader)``/``last_batch_idx`` bookkeeping and
per-batch collectives, ``loader.mixup_enabled = False`` at ``--mixup-off-epoch``; torchvision's
``train_sampler.set_epoch``, ``evaluate()``'s ``len(data_loader.dataset) == num_processed_samples``
over ranks and ``utils.accuracy`` on soft targets; a channels-last bfloat16 model forward.
"""
import json
import os
from argparse import Namespace

import pytest
import torch
from torch import nn

from dali_relabel.compat import from_timm, from_torchvision
from dali_relabel.config import DataConfig
from dali_relabel.training.losses import SoftTargetCrossEntropy
from helpers import TINY_CLASSES, TINY_FOLDERS, TINY_PER_FOLDER
from helpers import timm_args as _timm_args

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # every test runs the loaders (DALI pipelines)

NUM_IMAGES = TINY_FOLDERS * TINY_PER_FOLDER  # 24 images
FAST = dict(num_threads=1)
SMALL = dict(image_size=16, seed=5, **FAST)
TIMM_DATA = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
             "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}


@pytest.fixture
def image_set(tiny_set):
    """Random-texture JPEGs of different sizes and a random store over them."""
    return tiny_set.images, tiny_set.store


def _train(image_set, config, batch_size=4, **kwargs):
    from dali_relabel.loader import ReLabelLoader

    image_root, store = image_set
    return ReLabelLoader(image_root, store, batch_size, config=config, device="cpu", **kwargs)


def _val(image_set, batch_size=5, **kwargs):
    from dali_relabel.loader import ValidationLoader

    return ValidationLoader(image_set[0], batch_size, config=DataConfig(**SMALL), device="cpu", **kwargs)


def timm_args(**changes):
    """timm's defaults with this file's seed."""
    return _timm_args(**{"seed": 5, **changes})


# -- timm train.py, as written there -------------------------------------------------------------------
def timm_set_loader_epoch(loader, epoch: int) -> None:
    """timm ``train.py``'s ``_set_loader_epoch``."""
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def timm_epoch_bookkeeping(loader, accum_steps: int = 1):
    """The loop header of timm's ``train_one_epoch``: ``(batches, updates, last-batch flags,
    updates_per_epoch)`` as timm computes them from ``len(loader)`` before iterating."""
    updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
    last_batch_idx = len(loader) - 1
    batches = updates = 0
    last_flags = []
    for batch_idx, _ in enumerate(loader):
        last_batch = batch_idx == last_batch_idx
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        batches += 1
        updates += int(need_update)
        last_flags.append(last_batch)
    return batches, updates, last_flags, updates_per_epoch


def _rows(loader):
    return [rows.reshape(-1).tolist() for *_, rows in loader]


@pytest.mark.parametrize("style", ["timm", "torchvision"])
def test_the_scripts_set_epoch_chooses_the_epoch_also_in_a_resumed_process(image_set, style):
    def set_epoch(loader, epoch):
        if style == "timm":
            timm_set_loader_epoch(loader, epoch)
        else:  # torchvision: train_sampler = data_loader.sampler; train_sampler.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)

    config = DataConfig(**SMALL)
    running = _train(image_set, config, return_rows=True)
    epochs = []
    for epoch in range(3):
        set_epoch(running, epoch)
        epochs.append(_rows(running))
    assert epochs[0] != epochs[1] != epochs[2], "each epoch draws its own order"
    resumed = _train(image_set, config, return_rows=True)  # a new process after --resume at epoch 2
    set_epoch(resumed, 2)
    assert _rows(resumed) == epochs[2]
    for i, _ in enumerate(resumed):  # a pass left early, then the epoch set again: the whole epoch
        if i == 1:
            break
    set_epoch(resumed, 2)
    assert _rows(resumed) == epochs[2]


@pytest.mark.parametrize("which", ["train", "val", "val-rank1-of-2"])
def test_len_is_what_a_pass_yields_after_partial_passes(image_set, which):
    if which == "train":
        loader = _train(image_set, DataConfig(**SMALL))
    else:
        loader = _val(image_set, rank=1 if "rank1" in which else 0, world_size=2 if "of-2" in which else 1)
    next(iter(loader))  # a peek
    for i, _ in enumerate(loader):  # a pass left early
        if i == 1:
            break
    for accum_steps in (1, 2):
        batches, updates, last_flags, updates_per_epoch = timm_epoch_bookkeeping(loader, accum_steps)
        assert batches == len(loader)
        assert updates == updates_per_epoch
        assert last_flags[-1] and sum(last_flags) == 1, "timm's last_batch_idx is the pass's last batch"


def _validation_batches(image_set, world_size, batch_size, ranks):
    counts = []
    for rank in ranks:
        loader = _val(image_set, batch_size=batch_size, rank=rank, world_size=world_size)
        counts.append((len(loader), sum(1 for _ in loader)))
        loader.close()
    return counts


@pytest.mark.parametrize("world_size, batch_size", [(2, 5), (3, 5), (5, 5)])
def test_every_rank_yields_as_many_validation_batches_as_the_others(image_set, world_size, batch_size):
    """timm's ``validate`` all-reduces loss and accuracy once per batch: every rank must yield as
    many batches as the others, and as its ``len()`` (24 images: shards of 12, 8, 5 or 4 images)."""
    counts = _validation_batches(image_set, world_size, batch_size, (0, world_size - 1))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1], counts


def test_every_rank_yields_len_batches_when_its_shard_ends_on_a_batch_boundary(image_set):
    # 24 images on 5 ranks: shards of 5, 5, 5, 5 and 4 images; at batch size 4 the last rank's second
    # batch has no image of its own.
    counts = _validation_batches(image_set, 5, 4, (0, 4))
    assert counts[0] == counts[1] and counts[1][0] == counts[1][1], counts


def test_mixup_off_epoch_switches_mixing_off_as_timm_does(image_set):
    def timm_epoch_start(loader, args, epoch, prefetcher):
        timm_set_loader_epoch(loader, epoch)
        if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:  # train_one_epoch's first lines
            if prefetcher and loader.mixup_enabled:
                loader.mixup_enabled = False

    def passes(loader):
        return [(images.clone(), targets.clone()) for images, targets in loader]

    def same(a, b):
        return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))

    args = timm_args(mixup=0.8, cutmix=1.0, mixup_off_epoch=1)
    plain_args = timm_args()
    plain = _train(image_set, from_timm(TIMM_DATA, plain_args, **FAST))
    plain_epochs = []
    for epoch in range(2):
        timm_epoch_start(plain, plain_args, epoch, prefetcher=True)
        plain_epochs.append(passes(plain))
    for prefetcher in (True, False):  # --no-prefetcher: timm leaves the loader alone
        mixed = _train(image_set, from_timm(TIMM_DATA, args, **FAST))
        timm_epoch_start(mixed, args, 0, prefetcher)
        assert not same(passes(mixed), plain_epochs[0]), "epoch 0 is mixed"
        timm_epoch_start(mixed, args, 1, prefetcher)
        assert mixed.mixup_enabled is not prefetcher
        assert same(passes(mixed), plain_epochs[1]), "from --mixup-off-epoch on nothing is mixed"
    # The attribute alone must do it (a config that never stops mixing, the script switches it off).
    mixed = _train(image_set, from_timm(TIMM_DATA, args, cutmix_stop_epoch=None, **FAST))
    timm_epoch_start(mixed, args, 1, prefetcher=True)
    assert same(passes(mixed), plain_epochs[1])


# -- torchvision's reference script, as written there -------------------------------------------------
def torchvision_accuracy(output, target, topk=(1,)):
    """``references/classification/utils.py``'s ``accuracy`` (its 2-D branch is for mixed targets)."""
    with torch.inference_mode():
        maxk = max(topk)
        batch_size = target.size(0)
        if target.ndim == 2:
            target = target.max(dim=1)[1]
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target[None])
        return [correct[:k].flatten().sum(dtype=torch.float32) * (100.0 / batch_size) for k in topk]


def _evaluate_count(loader):
    """torchvision ``evaluate()``'s ``num_processed_samples`` on one rank (and the rows it saw)."""
    num_processed_samples, rows = 0, []
    for image, target, row in loader:
        num_processed_samples += image.shape[0]
        assert target.dtype == torch.int64 and target.shape == (image.shape[0],)
        rows += row.tolist()
    return num_processed_samples, rows


@pytest.mark.parametrize("world_size, batch_size", [(1, 5), (2, 5), (2, 7)])
def test_evaluate_processes_len_dataset_images_summed_over_ranks(image_set, world_size, batch_size):
    total, seen = 0, []
    for rank in range(world_size):
        loader = _val(image_set, batch_size=batch_size, rank=rank, world_size=world_size, return_rows=True)
        count, rows = _evaluate_count(loader)
        assert len(loader.dataset) == NUM_IMAGES, "len(dataset) is the whole set on every rank"
        total += count
        seen += rows
    assert total == NUM_IMAGES
    assert sorted(seen) == list(range(NUM_IMAGES)), "every image exactly once"


def _gloo_evaluate(rank, init_file, image_root, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from dali_relabel.loader import ValidationLoader

        loader = ValidationLoader(image_root, 5, config=DataConfig(**SMALL), device="cpu", return_rows=True)
        count, rows = _evaluate_count(loader)
        processed = torch.tensor(count)
        torch.distributed.all_reduce(processed)  # evaluate(): utils.reduce_across_processes
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(dict(dataset=len(loader.dataset), processed=int(processed), rows=rows), f)
        loader.close()
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_on_two_gloo_ranks_takes_the_rank_from_the_process_group(image_set, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_evaluate, args=(str(tmp_path / "init"), image_set[0], str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["dataset"] == result["processed"] == NUM_IMAGES
    assert sorted(results[0]["rows"] + results[1]["rows"]) == list(range(NUM_IMAGES))


def test_soft_targets_work_with_the_criterion_and_accuracy_of_the_reference(image_set):
    args = Namespace(auto_augment=None, random_erase=0.0, ra_sampler=False, interpolation="bilinear",
                     train_crop_size=16, val_crop_size=16, val_resize_size=18, mixup_alpha=0.2, cutmix_alpha=1.0,
                     label_smoothing=0.1)
    train_config, _ = from_torchvision(args, **FAST)
    assert train_config.label_smoothing == 0, "the script's CrossEntropyLoss smooths; the loader must not"
    loader = _train(image_set, train_config, return_labels=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # as in the script
    torch.manual_seed(0)
    for images, targets, labels in loader:
        assert targets.shape == (images.shape[0], TINY_CLASSES) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))
        output = torch.randn(len(targets), TINY_CLASSES)
        loss = criterion(output, targets)
        torch.testing.assert_close(loss, SoftTargetCrossEntropy(smoothing=0.1)(output, targets))
        acc1, acc2 = torchvision_accuracy(output, targets, topk=(1, 2))
        top = output.topk(2, 1).indices
        expected = targets.argmax(1)
        assert acc1.item() == pytest.approx(100.0 * (top[:, 0] == expected).float().mean().item())
        assert acc2.item() == pytest.approx(100.0 * (top == expected[:, None]).any(1).float().mean().item())
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)


# -- AMP and channels-last, as both scripts run them ----------------------------------------------------
def _tiny_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, TINY_CLASSES))


def test_channels_last_bfloat16_forward_and_backward(image_set):
    # timm --amp --amp-dtype bfloat16 --channels-last: float32 images in channels_last, autocast does bf16
    config = from_timm(TIMM_DATA, timm_args(channels_last=True, mixup=0.8, cutmix=1.0), **FAST)
    images, targets = next(iter(_train(image_set, config)))
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    same = images.contiguous(memory_format=torch.channels_last)  # what timm's loop does: must not copy
    assert same.data_ptr() == images.data_ptr()
    model = _tiny_model().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images)
        loss = SoftTargetCrossEntropy()(output, targets)
    assert output.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())

    # a bfloat16 model (timm --model-dtype bfloat16): bfloat16 channels_last images, no cast in between
    images, targets = next(iter(_train(image_set, config.replace(output_dtype="bfloat16"))))
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    model = _tiny_model().to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    output = model(images)
    SoftTargetCrossEntropy()(output, targets).backward()
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
