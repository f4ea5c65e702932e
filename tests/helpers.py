"""Shared factories for the tests: small JPEG trees, the tiny tree plus store, random top-k maps,
release-format map files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np


def make_jpeg_tree(root, num_classes: int, per_class: int, size: Tuple[int, int] = (12, 16),
                   seed: int = 0, sizes: Sequence[Tuple[int, int]] = None) -> List[str]:
    """Write real JPEGs in ImageFolder layout ``root/class_XX/img_YYY.JPEG``.

    ``size`` is (H, W) for every image unless ``sizes`` gives one (H, W) per image (in the order of
    the returned list). Returns the relative paths, sorted the way ``list_images`` orders them.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    relpaths = []
    n = 0
    for c in range(num_classes):
        folder = f"class_{c:02d}"
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i in range(per_class):
            h, w = sizes[n] if sizes is not None else size
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            rel = f"{folder}/img_{i:03d}.JPEG"
            Image.fromarray(pixels, "RGB").save(os.path.join(root, rel), format="JPEG", quality=90)
            relpaths.append(rel)
            n += 1
    return relpaths


TINY_FOLDERS, TINY_PER_FOLDER, TINY_CLASSES = 4, 6, 12


@dataclass(frozen=True)
class TinySet:
    """The tiny image tree and the store over it (see :func:`make_tiny_set`)."""

    root: str  #: the directory holding both
    images: str  #: the ImageFolder root
    store: str  #: the store's path
    relpaths: Tuple[str, ...]  #: the images, in store-row order
    num_classes: int  #: the store's classes (more than the tree's folders)

    @property
    def num_images(self) -> int:
        return len(self.relpaths)


def make_tiny_set(root) -> TinySet:
    """Write the tiny tree plus store that the loader tests share: 24 random-texture JPEGs of sizes
    30-69 px (crops change the pixels) in 4 folders ``class_00..class_03`` (6 each, labels 0-3), and a
    store of random top-3 maps on a 4x4 grid over 12 classes named ``class_00..class_11``."""
    from dali_relabel.store import write_store

    root = os.fspath(root)
    rng = np.random.default_rng(0)
    count = TINY_FOLDERS * TINY_PER_FOLDER
    sizes = [(int(rng.integers(30, 70)), int(rng.integers(30, 70))) for _ in range(count)]
    images = os.path.join(root, "images")
    relpaths = make_jpeg_tree(images, TINY_FOLDERS, TINY_PER_FOLDER, sizes=sizes)
    logits, ids = random_maps(count, 3, 4, 4, TINY_CLASSES, seed=1)
    labels = [int(p.split("/")[0][-2:]) for p in relpaths]
    store = write_store(os.path.join(root, "store.h5"), relpaths, logits, ids, TINY_CLASSES, labels=labels,
                        class_names=[f"class_{c:02d}" for c in range(TINY_CLASSES)])
    return TinySet(root, images, store, tuple(relpaths), TINY_CLASSES)


def tree_snapshot(root) -> Dict[str, Tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root``: equal snapshots mean
    nothing was added, removed or rewritten."""
    snapshot = {}
    for folder, _, files in os.walk(os.fspath(root)):
        for name in files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            snapshot[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return snapshot


def random_maps(n: int, k: int, h: int, w: int, num_classes: int, seed: int = 0):
    """Random top-k maps: ``logits`` float16 ``[n, k, H, W]`` and ``class_ids`` ``[n, k, H, W]``
    (int64) with ``k`` distinct ids in ``[0, num_classes)`` in every cell."""
    if k > num_classes:
        raise ValueError("k must not exceed num_classes")
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, k, h, w)).astype(np.float16)
    # argsort of random keys per cell gives a random permutation; keep its first k entries.
    keys = rng.random((n, h, w, num_classes))
    ids = np.argsort(keys, axis=-1)[..., :k]  # [n, H, W, k]
    class_ids = np.ascontiguousarray(np.moveaxis(ids, -1, 1)).astype(np.int64)
    return logits, class_ids


def write_release_tree(maps_dir, relpaths: Sequence[str], logits, class_ids) -> List[str]:
    """Write maps in the ReLabel authors' release format.

    One file per image at ``<maps_dir>/<class>/<stem>.pt``: a float32 tensor ``[2, k, H, W]``,
    index 0 the logits, index 1 the class ids as floats. Returns the written file paths.
    """
    import torch

    maps_dir = os.fspath(maps_dir)
    written = []
    for rel, lg, ci in zip(relpaths, logits, class_ids):
        stem = os.path.splitext(rel)[0]
        path = os.path.join(maps_dir, stem + ".pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensor = torch.stack([torch.as_tensor(np.asarray(lg, dtype=np.float32)),
                              torch.as_tensor(np.asarray(ci, dtype=np.float32))])
        torch.save(tensor, path)
        written.append(path)
    return written


def timm_args(**changes):
    """timm train.py's argument defaults for the flags ``from_timm`` reads, with ``changes``."""
    from argparse import Namespace

    args = dict(aa=None, reprob=0.0, vflip=0.0, aug_repeats=0, aug_splits=0, color_jitter=0.4,
                color_jitter_prob=None, grayscale_prob=None, gaussian_blur_prob=None, cutmix_minmax=None,
                no_aug=False, train_crop_mode=None, mixup_mode="batch", train_interpolation="random",
                scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, smoothing=0.1, seed=42, mixup=0.0,
                cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_off_epoch=0, channels_last=False)
    args.update(changes)
    return Namespace(**args)


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (no such process, or a zombie waiting for its parent)."""
    from dali_relabel.processes import process_state

    return process_state(pid) in ("", "Z", "X")


def wait_until_gone(pids, seconds: float = 10.0) -> list:
    """Wait up to ``seconds`` for ``pids`` to exit; the ones still there."""
    import time

    deadline = time.monotonic() + seconds
    while not all(process_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if not process_gone(p)]


_S3_SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test process closes the pipe (or dies)
server.stop()
"""


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 (a free port) in a process of its own.

    Not a thread of the test process: DALI's webdataset reader asks for its ``s3://`` tars' sizes
    while ``Pipeline.build()`` runs, and a server thread of the same process gets no turn to answer
    meanwhile (the build does not release the GIL): the SDK gives up after 3 s with curl's "Timeout
    was reached", index files or not. (``io.file.read``, which reads while the pipeline runs, is
    answered.) ``env`` adds variables to the server's environment (``INITIAL_NO_AUTH_ACTION_COUNT=0``
    makes it check credentials)."""

    def __init__(self, env: dict = None):
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-c", _S3_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env=dict(os.environ, **(env or {})), text=True)
        self.endpoint = f"http://127.0.0.1:{int(self.process.stdout.readline())}"

    def environment(self) -> dict:
        """The AWS variables that point boto3 and DALI at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
