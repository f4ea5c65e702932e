"""Evaluation: top-k and ReaL counting, the meter across ranks, checkpoints, and the whole
`dali-relabel evaluate` path on CPU.

The exact end-to-end tests use an "oracle" model: every class folder holds images of one solid
colour, and the oracle predicts the class whose colour is nearest to the image's mean colour, so its
top-1 accuracy is known (100 %) and its ReaL accuracy follows from the constructed real.json.
"""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dali_relabel.config import DataConfig
from dali_relabel.training.evaluation import build_model, evaluate, imagenetv2_classes, load_checkpoint
from dali_relabel.training.metrics import (EvalMeter, EvaluationError, MultiLabelAccuracy, align_real_labels,
                                  load_real_labels, real_correct, topk_correct)
from dali_relabel.imagefolder import list_images

SMALL = dict(image_size=32, val_resize=32, num_threads=1)


# ------------------------------------------------------------------------------------------------
# Counting on hand-made logits


def test_topk_correct_counts_hits_within_the_first_k():
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 0],    # label 0: top-1
                           [1., 9, 8, 7, 6, 5, 0],    # label 5: 5th -> top-5 only
                           [1., 9, 8, 7, 6, 5, 4],    # label 6: 6th -> neither
                           [0., 1, 2, 3, 9, 5, 6]])   # label 6: 2nd -> top-5 only
    labels = torch.tensor([0, 5, 6, 6])
    assert topk_correct(logits, labels) == {1: 1, 5: 3}
    assert topk_correct(logits, labels, ks=(1, 2, 7)) == {1: 1, 2: 2, 7: 4}
    # k beyond the number of classes: every sample is a hit.
    assert topk_correct(logits[:, :3], torch.tensor([0, 2, 1, 0]), ks=(1, 5)) == {1: 2, 5: 4}
    with pytest.raises(ValueError, match="labels"):
        topk_correct(logits, labels[:3])


def test_real_counts_set_membership_and_skips_empty_lists():
    # Predictions (arg-max): 2, 0, 1, 3, 3, 0.
    logits = torch.tensor([[0., 1, 5, 2],
                           [7., 1, 5, 2],
                           [0., 8, 5, 2],
                           [0., 1, 5, 9],
                           [0., 1, 5, 9],
                           [3., 1, 0, 2]])
    labels = torch.tensor([1, 0, 1, 0, 3, 1])
    # ReaL lists per file-list row; the batch holds rows 4, 0, 2, 5, 1, 3 (shuffled on purpose).
    real = [[3, 1],      # row 0: sample 1 predicts 0 -> wrong (though the hard label 0 is right)
            [],          # row 1: excluded
            [1],         # row 2: sample 2 predicts 1 -> right
            [],          # row 3: excluded
            [2, 1],      # row 4: sample 0 predicts 2 -> right (hard label 1 says wrong)
            [0, 2]]      # row 5: sample 3 predicts 3 -> wrong
    rows = torch.tensor([4, 0, 2, 5, 1, 3])
    assert real_correct(logits, rows, real) == (2, 4)
    assert topk_correct(logits, labels, ks=(1,)) == {1: 3}

    meter = MultiLabelAccuracy(real_labels=real)
    meter.update(logits[:4], labels[:4], rows[:4])
    meter.update(logits[4:], labels[4:], rows[4:])
    assert meter.reduce() is meter  # no process group: nothing to sum
    result = meter.result()
    assert result == {"top1": 50.0, "top5": 100.0, "real": 50.0, "num_images": 6, "num_real_images": 4}
    with pytest.raises(RuntimeError, match="after reduce"):
        meter.update(logits, labels, rows)

    with pytest.raises(IndexError):
        real_correct(logits, torch.tensor([0, 1, 2, 3, 4, 6]), real)
    with pytest.raises(IndexError):
        EvalMeter(real_labels=real).update(logits, labels, torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match="rows"):
        EvalMeter(real_labels=real).update(logits, labels)


def test_meter_without_real_and_without_images():
    assert EvalMeter().result() == {"top1": None, "top5": None, "real": None, "num_images": 0,
                                    "num_real_images": 0}
    meter = EvalMeter(real_labels=[[], []])
    meter.update(torch.eye(2), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert meter.result() == {"top1": 50.0, "top5": 100.0, "real": None, "num_images": 2,
                              "num_real_images": 0}


def test_load_real_labels_and_alignment(tmp_path):
    path = tmp_path / "real.json"
    path.write_text(json.dumps([[1], [], [0, 2], [2]]))
    real = load_real_labels(path)
    assert real == [[1], [], [0, 2], [2]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1], "x"]))
    with pytest.raises(EvaluationError, match="entry 1"):
        load_real_labels(bad)

    # ImageNet names: the number picks the entry, wherever the folder puts the file.
    relpaths = ["n01/ILSVRC2012_val_00000003.JPEG", "n01/ILSVRC2012_val_00000004.JPEG",
                "n02/ILSVRC2012_val_00000001.JPEG"]
    assert align_real_labels(real, relpaths) == [[0, 2], [2], [1]]
    with pytest.raises(EvaluationError, match="validation image 9"):
        align_real_labels(real, relpaths + ["n02/ILSVRC2012_val_00000009.JPEG"])
    # Other names: the entries follow the file list and must match it in length.
    assert align_real_labels(real, ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"]) == real
    with pytest.raises(EvaluationError, match="4 entries but the image set has 3"):
        align_real_labels(real, ["a/1.jpg", "a/2.jpg", "b/1.jpg"])


def test_imagenetv2_classes_give_folder_i_label_i(tmp_path):
    for name in ["0", "2", "10", "1"]:
        os.makedirs(tmp_path / name)
        Image.new("RGB", (4, 4)).save(tmp_path / name / "a.jpeg")
    classes = imagenetv2_classes(tmp_path)
    assert classes == [str(i) for i in range(11)]
    images = list_images(tmp_path, classes=classes)
    assert {path.split("/")[0]: label for path, label in zip(images.relpaths, images.labels)} == \
        {"0": 0, "1": 1, "2": 2, "10": 10}
    # Sorted as strings, "10" would have been label 2.
    assert list_images(tmp_path).labels == [0, 1, 2, 3]
    assert imagenetv2_classes(tmp_path, num_classes=1000)[999] == "999"
    with pytest.raises(EvaluationError, match="below 5"):
        imagenetv2_classes(tmp_path, num_classes=5)
    os.makedirs(tmp_path / "n01440764")
    with pytest.raises(EvaluationError, match="n01440764"):
        imagenetv2_classes(tmp_path)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _tiny_resnet(num_classes):
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model("resnet18", num_classes=num_classes, weights=None)


def test_checkpoint_formats(tmp_path):
    model = _tiny_resnet(3)
    ddp_state = {"module." + k: v for k, v in model.state_dict().items()}
    # torchvision's reference script saves args as an argparse.Namespace (and no num_classes).
    ns_path = tmp_path / "ns.pth"
    torch.save({"model": ddp_state, "args": argparse.Namespace(model="resnet18", val_crop_size=40),
                "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, ns_path)
    state, args = load_checkpoint(ns_path)
    assert args["model"] == "resnet18" and not any(k.startswith("module.") for k in state)
    rebuilt, name, num_classes = build_model(state, args)
    assert (name, num_classes) == ("resnet18", 3)  # classes inferred from fc.weight
    assert torch.equal(rebuilt.fc.weight, model.fc.weight)

    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    state, args = load_checkpoint(bare)
    assert args == {}
    with pytest.raises(EvaluationError, match="do not fit resnet34"):
        build_model(state, args, model_name="resnet34")

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------------
# Summing over ranks (gloo on CPU, two forked processes)


def _reduce_worker(rank, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        real = [[0], [], [1], [2]]
        meter = EvalMeter(real_labels=real)
        if rank == 0:  # rows 0, 1: one right (top-1 and ReaL), row 1 excluded from ReaL
            meter.update(torch.eye(3)[[0, 2]], torch.tensor([0, 0]), torch.tensor([0, 1]))
        else:          # rows 2, 3, 3: predictions 1, 1, 2
            meter.update(torch.eye(3)[[1, 1, 2]], torch.tensor([1, 2, 2]), torch.tensor([2, 3, 3]))
        result = meter.reduce().result()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_meter_reduce_sums_counts_over_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    expected = {"top1": 60.0, "top5": 100.0, "real": 75.0, "num_images": 5, "num_real_images": 4}
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# ------------------------------------------------------------------------------------------------
# End to end on CPU (DALI)


PALETTE = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]


class ColourOracle(torch.nn.Module):
    """Logits: one-hot of ``class_of[i]`` for the palette colour ``i`` nearest the image's mean colour."""

    def __init__(self, palette, class_of, num_classes, config):
        super().__init__()
        self.register_buffer("palette", torch.tensor(palette, dtype=torch.float32))
        self.register_buffer("class_of", torch.tensor(class_of))
        self.register_buffer("mean", 255 * torch.tensor(config.mean).view(1, 3))
        self.register_buffer("std", 255 * torch.tensor(config.std).view(1, 3))
        self.num_classes = num_classes

    def forward(self, images):
        rgb = images.float().mean(dim=(2, 3)) * self.std + self.mean
        nearest = torch.cdist(rgb, self.palette).argmin(dim=1)
        return torch.nn.functional.one_hot(self.class_of[nearest], self.num_classes).float()


def _write_solid(path, colour, size=(36, 44)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.broadcast_to(np.array(colour, np.uint8), size + (3,)).copy()
    Image.fromarray(pixels).save(path, quality=95)


@pytest.mark.slow
def test_oracle_model_is_scored_exactly_with_imagenet_val_numbering(tmp_path):
    from dali_relabel.loader import ValidationLoader

    # 3 classes x 4 images named like ImageNet's validation files, numbers interleaved across the
    # folders, so the tree's file order (folder, then name) differs from real.json's order.
    wnids = ["n0001", "n0002", "n0003"]
    real = []
    expected_correct = expected_counted = 0
    for number in range(1, 13):
        label = (number * 7) % 3
        _write_solid(str(tmp_path / "val" / wnids[label] / f"ILSVRC2012_val_{number:08d}.JPEG"),
                     PALETTE[label])
        # real.json: every third image excluded, every fourth one's list misses the (right) top-1.
        if number % 3 == 0:
            entry = []
        elif number % 4 == 0:
            entry = [(label + 1) % 3]
        else:
            entry = sorted({label, (label + 2) % 3})
        real.append(entry)
        if entry:
            expected_counted += 1
            expected_correct += label in entry
    (tmp_path / "real.json").write_text(json.dumps(real))
    assert (expected_correct, expected_counted) == (6, 8)

    config = DataConfig(**SMALL)
    loader = ValidationLoader(tmp_path / "val", batch_size=5, config=config, device="cpu", return_rows=True)
    oracle = ColourOracle(PALETTE[:3], [0, 1, 2], 3, config)
    result = evaluate(oracle, loader, real_labels=load_real_labels(tmp_path / "real.json"))
    assert result["num_images"] == 12 and result["num_real_images"] == 8
    assert result["top1"] == 100.0 and result["top5"] == 100.0
    assert result["real"] == 100.0 * 6 / 8
    assert result["images_per_second"] > 0

    # Without rows there is no ReaL; a second pass of the same loader works.
    with pytest.raises(ValueError, match="return_rows"):
        evaluate(oracle, ValidationLoader(tmp_path / "val", batch_size=5, config=config, device="cpu"),
                 real_labels=real)
    assert evaluate(oracle, loader)["top1"] == 100.0
    # NHWC float16 batches, autocast and channels-last memory format give the same numbers.
    nhwc = ValidationLoader(tmp_path / "val", batch_size=5, device="cpu", return_rows=True,
                            config=config.replace(channels_last=True, output_dtype="float16"))
    again = evaluate(oracle, nhwc, real_labels=real, amp_dtype=torch.bfloat16, channels_last=True)
    assert (again["top1"], again["real"], again["num_images"]) == (100.0, 75.0, 12)


@pytest.mark.slow
def test_oracle_model_on_imagenetv2_folders(tmp_path):
    from dali_relabel.loader import ValidationLoader

    # Folders named by class index; "10" sorts before "2" as a string.
    folders = ["0", "1", "2", "10"]
    for colour, folder in zip(PALETTE, folders):
        for i in range(3):
            _write_solid(str(tmp_path / folder / f"img{i}.jpeg"), colour)
    config = DataConfig(**SMALL)
    oracle = ColourOracle(PALETTE, [0, 1, 2, 10], 11, config)
    loader = ValidationLoader(tmp_path, batch_size=8, config=config, device="cpu",
                              classes=imagenetv2_classes(tmp_path))
    result = evaluate(oracle, loader)
    assert (result["top1"], result["num_images"], result["real"]) == (100.0, 12, None)
    # With the default (string-sorted) class list, folder "10" would be label 2 and "2" label 3.
    wrong = ValidationLoader(tmp_path, batch_size=8, config=config, device="cpu")
    assert evaluate(oracle, wrong)["top1"] == 50.0


@pytest.mark.slow
def test_cli_evaluate_end_to_end(tmp_path, capsys):
    from dali_relabel.tools.cli import main

    rng = np.random.default_rng(0)
    for c in range(3):
        for i in range(4):
            path = tmp_path / "val" / f"class_{c}" / f"img_{i}.JPEG"
            os.makedirs(path.parent, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    real = [[0], [], [0, 1], [2], [1], [1], [], [0], [2], [2, 0], [2], []]
    (tmp_path / "real.json").write_text(json.dumps(real))
    model = _tiny_resnet(3)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()},
                "args": {"model": "resnet18", "num_classes": 3, "image_size": 32, "val_resize": 32},
                "epoch": 1}, checkpoint)
    out = tmp_path / "result.json"
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--val", str(tmp_path / "val"),
                 "--real", str(tmp_path / "real.json"), "--batch-size", "5", "--device", "cpu",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "top-1" in printed and "ReaL" in printed
    result = json.loads(out.read_text())
    assert result["num_images"] == 12 and result["num_real_images"] == 9
    assert (result["model"], result["num_classes"], result["image_size"]) == ("resnet18", 3, 32)
    for key in ("top1", "top5", "real"):
        assert 0.0 <= result[key] <= 100.0
    assert result["top5"] == 100.0  # 3 classes

    # A wrong architecture is a clear error, not a traceback.
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--val", str(tmp_path / "val"),
                 "--model", "resnet34", "--device", "cpu"])
    assert code == 2 and "do not fit resnet34" in capsys.readouterr().err
