"""The training script: a short CPU run, resuming, and a two-process DDP (gloo) run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dali_relabel.store import write_store

pytest.importorskip("nvidia.dali")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "pipelines", "train.py")


def make_square_set(root, num_images=24, num_classes=3, size=32):
    """Square noise images (so a whole-image crop is deterministic) and a random store."""
    rng = np.random.default_rng(0)
    image_root = os.path.join(root, "images")
    paths = []
    for i in range(num_images):
        folder = f"c{i % num_classes}"
        os.makedirs(os.path.join(image_root, folder), exist_ok=True)
        path = f"{folder}/{i:03d}.JPEG"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(image_root, path), quality=95)
        paths.append(path)
    paths.sort()
    logits = rng.normal(size=(num_images, 2, 4, 4)).astype(np.float16) * 3
    ids = np.stack([np.stack([rng.permutation(num_classes)[:2] for _ in range(16)], -1).reshape(2, 4, 4)
                    for _ in range(num_images)])
    store = os.path.join(root, "store.h5")
    write_store(store, paths, logits, ids, num_classes, class_names=[f"c{c}" for c in range(num_classes)],
                labels=[int(p[1]) for p in paths])
    return image_root, store


def _args(image_root, store, out, *extra):
    return ["--data", image_root, "--store", store, "--model", "tiny_cnn", "--image-size", "32",
            "--val-resize", "32", "--workers", "1", "--threads", "1", "--device", "cpu",
            "--output-dir", out, "--warmup-epochs", "0", "--print-freq", "1", *extra]


def _run_main(argv):
    sys.path.insert(0, os.path.join(ROOT, "pipelines"))
    try:
        import train
    finally:
        sys.path.pop(0)
    return train.main(train.get_args_parser().parse_args(argv))


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_cpu_run_writes_metrics_checkpoint_and_resumes(tmp_path):
    image_root, store = make_square_set(str(tmp_path))
    out = str(tmp_path / "run")
    result = _run_main(_args(image_root, store, out, "--epochs", "1", "--batch-size", "8",
                             "--val", image_root, "--cutmix-prob", "0.5", "--cutmix-mode", "localized"))
    assert result["epoch"] == 0 and result["images"] == 24 and result["images_per_second"] > 0
    assert 0 <= result["val_top1"] <= 100
    with open(os.path.join(out, "args.json")) as f:
        assert json.load(f)["num_classes"] == 3
    import torch

    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "data"} <= set(checkpoint)
    assert checkpoint["data"] == {"epoch": 1, "batch": 0}
    # Asking for two epochs with --resume auto trains only the second.
    _run_main(_args(image_root, store, out, "--epochs", "2", "--batch-size", "8", "--resume", "auto"))
    epochs = [m["epoch"] for m in _metrics(out) if "train_loss" in m]
    assert epochs == [0, 1]


def test_original_targets_train_without_a_store(tmp_path):
    image_root, _ = make_square_set(str(tmp_path))
    out = str(tmp_path / "run")
    argv = _args(image_root, "unused", out, "--epochs", "1", "--batch-size", "8", "--targets", "original")
    argv.remove("--store")
    argv.remove("unused")
    assert _run_main(argv)["images"] == 24


def _read_rows(out, rank):
    with open(os.path.join(out, f"rows_rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_process_gloo_run_shards_and_matches_a_single_process(tmp_path):
    image_root, store = make_square_set(str(tmp_path), num_images=32)
    deterministic = ["--scale", "1", "1", "--ratio", "1", "1", "--flip-probability", "0", "--epochs", "2",
                     "--log-rows", "--lr", "0.5"]
    ddp_out, single_out = str(tmp_path / "ddp"), str(tmp_path / "single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
               *_args(image_root, store, ddp_out, "--batch-size", "4", *deterministic)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _run_main(_args(image_root, store, single_out, "--batch-size", "8", *deterministic))

    ranks = [_read_rows(ddp_out, r) for r in range(2)]
    single = _read_rows(single_out, 0)
    for epoch in range(2):
        seen = [{row for step in rank if step["epoch"] == epoch for row in step["rows"]} for rank in ranks]
        assert not seen[0] & seen[1], "the ranks' shards overlap"
        assert seen[0] | seen[1] == set(range(32)), "an epoch missed samples"
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 8
    for a, b, s in zip(ranks[0], ranks[1], single):
        assert set(a["rows"]) | set(b["rows"]) == set(s["rows"]), "steps saw different samples"
        assert abs((a["loss"] + b["loss"]) / 2 - s["loss"]) < 1e-4 * max(1.0, abs(s["loss"]))
