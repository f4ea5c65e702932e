"""Shared by the tests of ``dali-relabel generate`` (label maps and region labels): smooth image
trees, one torch thread, and runs interrupted in a writer's second write."""
from __future__ import annotations

import os
import shutil
from typing import List, Sequence, Tuple

import numpy as np
import pytest
import torch


def smooth_image_tree(root, num_classes: int, per_class: int, sizes: Sequence[Tuple[int, int]], ext: str = "jpg",
                      seed: int = 0) -> List[Tuple[int, int]]:
    """Smooth (low-frequency) images ``root/class_<c>/img_<i>.<ext>`` of the (H, W) ``sizes`` in turn:
    DALI and PIL preprocess them almost alike (PNG: decoded to the same pixels). Returns each image's
    (H, W) in ``list_images`` order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    made = []
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(c + i) % len(sizes)]
            small = Image.fromarray(rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8), "RGB")
            options = dict(quality=95) if ext == "jpg" else {}
            small.resize((w, h), Image.BICUBIC).save(os.path.join(root, f"class_{c}", f"img_{i}.{ext}"), **options)
            made.append((h, w))
    return made


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared CI box: one intra-op thread is faster and steadier (restored after).
    Autouse in every test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record_write_starts(monkeypatch, writer_class) -> List[int]:
    """The ``start`` of every ``writer_class.write`` call from now on (the list fills as they come)."""
    starts = []
    original = writer_class.write

    def write(self, start, *args, **kwargs):
        starts.append(start)
        return original(self, start, *args, **kwargs)

    monkeypatch.setattr(writer_class, "write", write)
    return starts


def interrupt_second_write(folder, name: str, writer_class, run) -> None:
    """``run(folder / name)`` stopped by a ``KeyboardInterrupt`` in its second ``writer_class.write``;
    checks that it left ``<name>.partial`` and its settings file, nothing else."""
    original = writer_class.write
    calls = []

    def write(self, start, *args, **kwargs):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, start, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(writer_class, "write", write)
        with pytest.raises(KeyboardInterrupt):
            run(folder / name)
    assert sorted(os.listdir(folder)) == [f"{name}.generate.json", f"{name}.partial"]


def copy_files(source, target, name: str):
    """Every file of the folder ``source`` copied into ``target``; returns ``target / name``."""
    for entry in os.listdir(source):
        shutil.copy(source / entry, target / entry)
    return target / name
