"""Benchmarks: training-loader throughput, the fused operator, and store reads (``dali-relabel bench``).

``run_throughput`` times, on one generated ImageNet-like image set and in one run, alternating
``A B C A B C ...`` after a warm-up:

1. ``plain-dali``: ``plain_train_pipeline`` (``readers.file`` + random-resized crop + flip + normalize,
   hard labels) through ``DALIGenericIterator``;
2. ``dali-relabel``: :class:`~dali_relabel.loader.ReLabelLoader` with soft targets;
3. ``authors``: the ReLabel authors' approach: a PyTorch ``DataLoader`` (PIL decode, torchvision
   random-resized crop + flip + ``ToTensor`` + ``Normalize``, one ``torch.load`` of the image's ``.pt``
   map per sample, crop coordinates recorded), then per batch the dense scatter into
   ``zeros[B, C, 15, 15]`` + ``roi_align`` + softmax (:func:`~dali_relabel.reference.reference_label_pooling`,
   layout ``"WH"``);

and ``op``: the fused operator (:class:`~dali_relabel.fused.FusedLabelPooling`) against the dense
reference per batch size and device, with the cost of feeding the operator's pipeline measured
separately, and the fused output checked against the reference (``max_abs_diff``).

``run_store_read`` times a random batch of rows read from an HDF5 store against ``torch.load`` of as
many per-image ``.pt`` files.

Results go to ``<out-dir>/throughput-<device>-<date>.json`` (+ ``.png`` and ``latest-<device>.md``)
and ``<out-dir>/store-read-<date>.json`` (+ ``.png`` and ``latest-store-read.md``).
``benchmarks/run.py`` and ``benchmarks/store_read.py`` in the repository are thin wrappers.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

DATA_VERSION = 1
CONTENDERS = ("plain", "relabel", "authors", "op")
CONTENDER_NAMES = {"plain": "plain-dali", "relabel": "dali-relabel", "authors": "authors", "op": "op"}
CONTENDER_LABELS = {
    "plain-dali": "plain DALI (hard labels)",
    "dali-relabel": "dali-relabel (soft targets)",
    "authors": "authors' approach (DataLoader + .pt + dense RoIAlign)",
}
_ALIASES = {"plain": "plain", "plain-dali": "plain", "relabel": "relabel", "dali-relabel": "relabel",
            "authors": "authors", "pytorch": "authors", "op": "op", "operator": "op"}
OP_TOLERANCE = 1e-5


class BenchError(RuntimeError):
    """A benchmark cannot run with the given settings."""


def _log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# Generated data: photo-like JPEGs, random top-k maps, the store and the authors' .pt files
# ------------------------------------------------------------------------------------------------
def class_name(c: int) -> str:
    """WordNet-id-like folder name of class ``c``."""
    return f"n{c:08d}"


def distinct_class_ids(rng: np.random.Generator, n: int, k: int, h: int, w: int, num_classes: int) -> np.ndarray:
    """``[n, k, h, w]`` int64 class ids, uniformly random and distinct within every cell."""
    if k > num_classes:
        raise BenchError(f"k={k} distinct classes per cell need num_classes >= k, got {num_classes}")
    chosen = np.empty((n, h, w, k), dtype=np.int64)
    for j in range(k):
        # The r-th class not chosen yet: step r past the chosen ones in increasing order.
        r = rng.integers(0, num_classes - j, size=(n, h, w))
        for previous in np.moveaxis(np.sort(chosen[..., :j], axis=-1), -1, 0):
            r += r >= previous
        chosen[..., j] = r
    return np.ascontiguousarray(np.moveaxis(chosen, -1, 1))


def random_topk_maps(rng: np.random.Generator, n: int, k: int, h: int, w: int, num_classes: int):
    """Random top-k maps: ``logits [n, k, h, w]`` float16 (descending along k) and distinct ids."""
    logits = -np.sort(-rng.normal(2.0, 3.0, size=(n, k, h, w)), axis=1)
    return logits.astype(np.float16), distinct_class_ids(rng, n, k, h, w, num_classes)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell: int, amplitude: float) -> np.ndarray:
    from PIL import Image

    small = rng.normal(0.0, 1.0, size=(h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1) * amplitude


def render_photo(rng: np.random.Generator, h: int, w: int, detail: float) -> np.ndarray:
    """A photo-like ``[h, w, 3]`` uint8 image: smooth colour fields at several scales, a few
    blurred shapes, fine texture and sensor-like noise; ``detail`` scales the last two (and so the
    JPEG size)."""
    from PIL import Image, ImageDraw, ImageFilter

    base = rng.uniform(60, 190, size=3).astype(np.float32)
    pixels = base + _smooth_field(rng, h, w, 64, 40) + _smooth_field(rng, h, w, 12, 18)
    pixels += _smooth_field(rng, h, w, 3, 10)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = rng.uniform(-0.1, 0.9) * w, rng.uniform(-0.1, 0.9) * h
        sw, sh = rng.uniform(0.08, 0.5) * w, rng.uniform(0.08, 0.5) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x0 + sw, y0 + sh), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + sw, y0 + sh), fill=colour)
        else:
            draw.polygon([(x0, y0 + sh), (x0 + sw / 2, y0), (x0 + sw, y0 + sh)], fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8))).astype(np.float32)
    pixels += _smooth_field(rng, h, w, 2, 6 * detail)
    pixels += rng.normal(0.0, 9.0 * detail, size=pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _image_size(rng: np.random.Generator, base=(375, 500), spread: float = 0.3):
    return tuple(int(round(s * rng.uniform(1 - spread, 1 + spread))) for s in base)


def _jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def calibrate_detail(target_bytes: float, quality: int = 90, samples: int = 8, seed: int = 12345,
                     iterations: int = 4) -> float:
    """The ``detail`` of :func:`render_photo` that gives JPEGs of ``target_bytes`` on average
    (secant steps on a fixed sample of images)."""
    def mean_size(detail):
        rng = np.random.default_rng(seed)
        sizes = []
        for _ in range(samples):
            h, w = _image_size(rng)
            sizes.append(len(_jpeg_bytes(render_photo(rng, h, w, detail), quality)))
        return float(np.mean(sizes))

    x0, y0 = 1.0, mean_size(1.0)
    x1 = x0 * (target_bytes / y0) ** 1.5
    for _ in range(iterations):
        x1 = float(np.clip(x1, 0.05, 20.0))
        y1 = mean_size(x1)
        if abs(y1 - target_bytes) < 0.03 * target_bytes or abs(y1 - y0) < 1:
            return x1
        x0, y0, x1 = x1, y1, x1 + (target_bytes - y1) * (x1 - x0) / (y1 - y0)
    return float(np.clip(x1, 0.05, 20.0))


def _render_chunk(task):
    root, items, detail, quality, seed = task
    out = []
    for index, relpath in items:
        rng = np.random.default_rng([seed, index])
        h, w = _image_size(rng)
        data = _jpeg_bytes(render_photo(rng, h, w, detail), quality)
        with open(os.path.join(root, relpath), "wb") as f:
            f.write(data)
        out.append((index, h, w, len(data)))
    return out


@dataclass
class BenchData:
    """A generated image set (ImageFolder), its label store and the same maps as per-image ``.pt``."""

    root: str
    image_root: str
    store_path: str
    maps_dir: str
    num_images: int
    num_classes: int
    manifest: dict


def image_set_dir(data_dir: str, num_images: int, num_classes: int, seed: int, quality: int,
                  jpeg_kb: float) -> str:
    return os.path.join(data_dir, f"imagenet-like-n{num_images}-c{num_classes}-s{seed}-q{quality}"
                                  f"-kb{jpeg_kb:g}-v{DATA_VERSION}")


def write_release_map(path: str, logits: np.ndarray, class_ids: np.ndarray) -> None:
    """One map in the authors' release format: float32 ``[2, k, H, W]`` (logits, class ids as floats)."""
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(torch.from_numpy(np.stack([logits.astype(np.float32), class_ids.astype(np.float32)])), path)


def prepare_image_set(data_dir: str, num_images: int = 2048, num_classes: int = 1000, seed: int = 0,
                      quality: int = 90, jpeg_kb: float = 110.0, k: int = 5, grid: int = 15,
                      workers: Optional[int] = None, log: Callable[[str], None] = _log) -> BenchData:
    """Generate (or reuse) the benchmark image set under ``data_dir``.

    Images are photo-like JPEGs around 500x375 (each side within +-30 %) at ``quality``, about
    ``jpeg_kb`` KB on average, spread round-robin over ``num_classes`` folders ``n00000000 ...``
    (only folders that receive an image are created). The store holds random top-``k``
    ``grid x grid`` maps over ``num_classes`` classes with distinct ids per cell, layout ``"WH"``;
    ``maps/<class>/<stem>.pt`` holds the same maps in the authors' release format.
    """
    from .convert import map_relpath
    from .store import write_store

    if num_images < 1 or num_classes < k:
        raise BenchError(f"need at least 1 image and num_classes >= k={k} (got {num_images}, {num_classes})")
    root = image_set_dir(data_dir, num_images, num_classes, seed, quality, jpeg_kb)
    manifest_path = os.path.join(root, "manifest.json")
    data = BenchData(root, os.path.join(root, "images"), os.path.join(root, "store.h5"),
                     os.path.join(root, "maps"), num_images, num_classes, {})
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            data.manifest = json.load(f)
        log(f"reusing the image set {root}: {num_images} images, mean JPEG "
            f"{data.manifest['mean_jpeg_bytes'] / 1000:.1f} KB, {num_classes} classes")
        return data
    started = time.time()
    os.makedirs(root, exist_ok=True)
    relpaths = [f"{class_name(i % num_classes)}/{class_name(i % num_classes)}_{i:07d}.JPEG"
                for i in range(num_images)]
    for folder in sorted({p.split("/")[0] for p in relpaths}):
        os.makedirs(os.path.join(data.image_root, folder), exist_ok=True)
        os.makedirs(os.path.join(data.maps_dir, folder), exist_ok=True)
    log(f"calibrating the JPEG generator for {jpeg_kb:g} KB at quality {quality} ...")
    detail = calibrate_detail(jpeg_kb * 1000, quality)
    workers = workers or min(8, os.cpu_count() or 1)
    log(f"generating {num_images} JPEGs over {len({p.split('/')[0] for p in relpaths})} class folders "
        f"with {workers} processes (detail {detail:.2f}) ...")
    chunk = max(1, math.ceil(num_images / (workers * 4)))
    tasks = [(data.image_root, list(enumerate(relpaths))[s:s + chunk], detail, quality, seed)
             for s in range(0, num_images, chunk)]
    sizes = np.zeros((num_images, 2), np.int32)
    file_bytes = np.zeros(num_images, np.int64)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(_render_chunk, tasks):
            for index, h, w, nbytes in done:
                sizes[index] = (h, w)
                file_bytes[index] = nbytes
    rng = np.random.default_rng([seed, 1])
    logits, class_ids = random_topk_maps(rng, num_images, k, grid, grid, num_classes)
    order = sorted(range(num_images), key=lambda i: relpaths[i])  # the store's rows in list_images order
    labels = np.arange(num_images) % num_classes
    write_store(data.store_path, [relpaths[i] for i in order], logits[order], class_ids[order], num_classes,
                class_names=[class_name(c) for c in range(num_classes)], layout="WH",
                labels=labels[order], image_sizes=sizes[order], source="benchmark",
                teacher="random")
    for i, relpath in enumerate(relpaths):
        write_release_map(os.path.join(data.maps_dir, map_relpath(relpath)), logits[i], class_ids[i])
    pt_bytes = [os.path.getsize(os.path.join(data.maps_dir, map_relpath(p))) for p in relpaths[:64]]
    data.manifest = {
        "version": DATA_VERSION, "num_images": num_images, "num_classes": num_classes, "seed": seed,
        "quality": quality, "target_jpeg_bytes": jpeg_kb * 1000, "detail": detail,
        "mean_jpeg_bytes": float(file_bytes.mean()), "median_jpeg_bytes": float(np.median(file_bytes)),
        "min_jpeg_bytes": int(file_bytes.min()), "max_jpeg_bytes": int(file_bytes.max()),
        "mean_image_hw": [float(sizes[:, 0].mean()), float(sizes[:, 1].mean())],
        "min_image_hw": sizes.min(axis=0).tolist(), "max_image_hw": sizes.max(axis=0).tolist(),
        "k": k, "grid": [grid, grid], "layout": "WH",
        "store_bytes_per_image": os.path.getsize(data.store_path) / num_images,
        "pt_bytes_per_image": float(np.mean(pt_bytes)),
        "generation_seconds": round(time.time() - started, 1),
    }
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(data.manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    m = data.manifest
    log(f"wrote {num_images} JPEGs: mean {m['mean_jpeg_bytes'] / 1000:.1f} KB (median "
        f"{m['median_jpeg_bytes'] / 1000:.1f} KB, {m['min_jpeg_bytes'] / 1000:.0f}-"
        f"{m['max_jpeg_bytes'] / 1000:.0f} KB), mean size {m['mean_image_hw'][1]:.0f}x{m['mean_image_hw'][0]:.0f} "
        f"(WxH), store {m['store_bytes_per_image']:.0f} B/image, .pt {m['pt_bytes_per_image']:.0f} B/image, "
        f"in {m['generation_seconds']} s -> {root}")
    return data


# ------------------------------------------------------------------------------------------------
# Machine and version info
# ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "hostname": platform.node(),
            "cpu_model": None, "cpu_count": os.cpu_count(), "memory_bytes": None, "gpu": None}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cores"] = os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_bytes"] = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # info only
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def versions() -> dict:
    from . import __version__

    out = {"python": sys.version.split()[0], "dali_relabel": __version__}
    for name, module in (("torch", "torch"), ("torchvision", "torchvision"), ("dali", "nvidia.dali"),
                         ("numpy", "numpy"), ("h5py", "h5py"), ("pillow", "PIL")):
        try:
            out[name] = getattr(__import__(module, fromlist=["__version__"]), "__version__", None)
        except Exception:
            out[name] = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except Exception:
        pass
    return out


def _summary(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    median = statistics.median(values)
    return {"all": values, "median": median, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / median if median else None}


def _date() -> str:
    return datetime.date.today().isoformat()


# ------------------------------------------------------------------------------------------------
# The contenders of the throughput benchmark
# ------------------------------------------------------------------------------------------------
def _endless(epoch: Callable[[], Iterator]):
    """Batches of epoch after epoch (``epoch()`` starts one)."""
    while True:
        empty = True
        for batch in epoch():
            empty = False
            yield batch
        if empty:
            raise BenchError("a contender produced an empty epoch")


@dataclass
class Contender:
    name: str
    stream: Iterator
    count: Callable[[object], int]
    drain: int  # batches a contender may have prepared while idle; taken untimed before each segment
    check: Optional[Callable[[object], float]] = None
    last_batch: object = None


def _soft_target_error(targets) -> float:
    """Largest deviation of a soft-target row sum from 1 (a cheap check that real targets came out)."""
    import torch

    targets = targets.float()
    return float((targets.reshape(len(targets), -1).sum(1) - 1).abs().max()) if torch.is_tensor(targets) else 0.0


def make_plain_dali(data: BenchData, config, batch_size: int, device: str) -> Contender:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from .pipelines.graphs import plain_train_pipeline

    pipe = plain_train_pipeline(data.image_root, config, decoder_device="mixed" if device == "gpu" else "cpu",
                                batch_size=batch_size, num_threads=config.num_threads,
                                device_id=0 if device == "gpu" else None, seed=config.seed,
                                prefetch_queue_depth=config.prefetch_queue_depth, exec_dynamic=True)
    iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)

    def epoch():
        for outputs in iterator:
            yield outputs[0]["images"], outputs[0]["labels"]

    return Contender("plain-dali", _endless(epoch), lambda b: len(b[0]), drain=2 * config.prefetch_queue_depth)


def make_relabel(data: BenchData, config, batch_size: int, device: str) -> Contender:
    from .loader import ReLabelLoader

    loader = ReLabelLoader(data.image_root, data.store_path, batch_size=batch_size, config=config, device=device)
    return Contender("dali-relabel", _endless(lambda: iter(loader)), lambda b: len(b[0]),
                     drain=2 * config.prefetch_queue_depth, check=lambda b: _soft_target_error(b[1]))


class AuthorsDataset:
    """The authors' per-sample work: PIL decode, random-resized crop with its coordinates, flip,
    ``ToTensor`` + ``Normalize``, and one ``torch.load`` of the image's ``.pt`` map."""

    def __init__(self, image_root: str, maps_dir: str, relpaths: Sequence[str], labels: Sequence[int],
                 config):
        self.image_root, self.maps_dir = image_root, maps_dir
        self.relpaths, self.labels = list(relpaths), list(labels)
        self.size = config.image_size
        self.scale, self.ratio = tuple(config.scale), tuple(config.ratio)
        self.flip_probability = config.flip_probability
        self.mean = [m / 255.0 for m in config.mean]
        self.std = [s / 255.0 for s in config.std]

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int):
        import random

        import torch
        import torchvision.transforms.functional as F
        from PIL import Image
        from torchvision.transforms import InterpolationMode, RandomResizedCrop

        from .convert import map_relpath

        relpath = self.relpaths[index]
        with open(os.path.join(self.image_root, relpath), "rb") as f:
            image = Image.open(f).convert("RGB")
        width, height = image.size
        top, left, h, w = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
        flip = random.random() < self.flip_probability
        if flip:
            image = F.hflip(image)
        tensor = F.normalize(F.to_tensor(image), self.mean, self.std)
        label_map = torch.load(os.path.join(self.maps_dir, map_relpath(relpath)), map_location="cpu",
                               weights_only=True)
        coords = torch.tensor([top / height, left / width, (top + h) / height, (left + w) / width])
        return tensor, self.labels[index], label_map, coords, flip


def authors_targets(label_maps, coords, flips, num_classes: int, device: str):
    """The authors' per-batch target computation (on the GPU for ``device="gpu"``)."""
    from .reference import reference_label_pooling

    logits, class_ids = label_maps[:, 0], label_maps[:, 1]
    if device == "gpu":
        logits, class_ids = logits.cuda(non_blocking=True), class_ids.cuda(non_blocking=True)
    return reference_label_pooling(logits, class_ids.long(), coords, num_classes, layout="WH", flips=flips)


def make_authors(data: BenchData, config, batch_size: int, device: str, workers: int) -> Contender:
    import torch

    from .store import LabelStore

    store = LabelStore(data.store_path, verify="header")
    dataset = AuthorsDataset(data.image_root, data.maps_dir, store.paths, store.labels.tolist(), config)
    num_classes = store.num_classes
    store.close()
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device == "gpu", generator=generator)

    def epoch():
        for images, labels, label_maps, coords, flips in loader:
            if device == "gpu":
                images = images.cuda(non_blocking=True)
            yield images, authors_targets(label_maps, coords, flips, num_classes, device)

    prefetch = 2 * max(workers, 1)  # DataLoader's prefetch_factor (2) per worker
    return Contender("authors", _endless(epoch), lambda b: len(b[0]), drain=prefetch,
                     check=lambda b: _soft_target_error(b[1]))


def _sync(device: str) -> None:
    if device == "gpu":
        import torch

        torch.cuda.synchronize()


def _take(contender: Contender, batches: int) -> int:
    images = 0
    for _ in range(batches):
        batch = next(contender.stream)
        images += contender.count(batch)
        contender.last_batch = batch
    return images


def time_segment(contender: Contender, batches: int, device: str) -> float:
    """Images per second over ``batches`` batches, after taking the batches prepared while idle."""
    _take(contender, contender.drain)
    _sync(device)
    start = time.perf_counter()
    images = _take(contender, batches)
    _sync(device)
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# Operator micro-benchmark
# ------------------------------------------------------------------------------------------------
def random_crop_batch(rng: np.random.Generator, batch: int, num_classes: int, k: int = 5, grid: int = 15,
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Operator inputs like the training graph's: maps, random-resized-crop windows of ~500x375
    images, image shapes ``(H, W, 3)`` and mirror flags (the store's dtypes)."""
    logits, ids = random_topk_maps(rng, batch, k, grid, grid, num_classes)
    from .store import class_id_dtype

    images = np.array([_image_size(rng) for _ in range(batch)], dtype=np.int64)
    anchors, shapes = np.zeros((batch, 2), np.int32), np.zeros((batch, 2), np.int32)
    for i, (h, w) in enumerate(images):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(min(w, max(1, round(math.sqrt(area * aspect)))))
        ch = int(min(h, max(1, round(math.sqrt(area / aspect)))))
        anchors[i] = (rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1))
        shapes[i] = (ch, cw)
    image_shapes = np.concatenate([images, np.full((batch, 1), 3, np.int64)], axis=1)
    mirror = rng.integers(0, 2, size=batch).astype(np.int32)
    return logits, ids.astype(class_id_dtype(num_classes)), anchors, shapes, image_shapes, mirror


def _time_calls(function, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        function()
    return (time.perf_counter() - start) / inner


def run_op_benchmark(batch_sizes: Sequence[int], devices: Sequence[str], num_classes: int, repeats: int,
                     threads: int, seed: int = 0, target_seconds: float = 0.2,
                     log: Callable[[str], None] = _log) -> dict:
    """Fused operator vs the dense reference (and the feed overhead), per device and batch size.

    Every measurement is the mean of ``inner`` calls (chosen so one measurement takes about
    ``target_seconds``); ``repeats`` measurements per variant, alternating fused / feed / reference.
    Host arrays in, host tensor out for all three. ``max_abs_diff`` compares the fused output with
    :func:`~dali_relabel.reference.reference_label_pooling` on the same batch.
    """
    import torch

    from .fused import FusedLabelPooling
    from .reference import crop_boxes, reference_label_pooling

    results = []
    for device in devices:
        for batch in batch_sizes:
            rng = np.random.default_rng([seed, batch])
            inputs = random_crop_batch(rng, batch, num_classes)
            logits, ids, anchors, shapes, image_shapes, mirror = inputs
            boxes = crop_boxes(anchors, shapes, image_shapes)
            fused = FusedLabelPooling(num_classes, batch, layout="WH", device=device, num_threads=threads)
            # The same pipeline without the operator: its time is the feed overhead of a fused call.
            feed = FusedLabelPooling(num_classes, batch, device=device, num_threads=threads, pool=False)
            logits_t, ids_t = torch.from_numpy(logits), torch.from_numpy(ids.astype(np.int64))

            on_device = (logits_t.cuda(), ids_t.cuda()) if device == "gpu" else (logits_t, ids_t)

            def reference():  # the dense reference on the operator's device, result on the host
                return reference_label_pooling(*on_device, boxes, num_classes, layout="WH", flips=mirror).cpu()

            run_fused, run_feed = functools.partial(fused, *inputs), functools.partial(feed, *inputs)
            expected = reference_label_pooling(logits_t, ids_t, boxes, num_classes, layout="WH", flips=mirror)
            got = run_fused()
            max_abs_diff = float((got.float() - expected).abs().max())
            same_device_reference = float((reference().float() - expected).abs().max())
            variants = {"fused": run_fused, "feed": run_feed, "reference": reference}
            inner = {}
            for name, function in variants.items():  # warm-up, and how many calls make one measurement
                function()
                once = _time_calls(function, 1)
                inner[name] = int(min(200, max(1, round(target_seconds / max(once, 1e-6)))))
            times = {name: [] for name in variants}
            for _ in range(repeats):
                for name, function in variants.items():
                    times[name].append(_time_calls(function, inner[name]))
            fused_s, feed_s, ref_s = (statistics.median(times[n]) for n in ("fused", "feed", "reference"))
            op_s = fused_s - feed_s
            row = {
                "device": device, "batch_size": batch, "num_classes": num_classes,
                "fused_ms": 1e3 * fused_s, "feed_ms": 1e3 * feed_s, "op_ms": 1e3 * op_s,
                "reference_ms": 1e3 * ref_s,
                "fused_samples_per_s": batch / fused_s, "reference_samples_per_s": batch / ref_s,
                "raw_speedup": ref_s / fused_s,
                "op_only_speedup": ref_s / op_s if op_s > 0 else None,
                "max_abs_diff": max_abs_diff, "reference_on_device_max_abs_diff": same_device_reference,
                "calls_per_measurement": inner,
                "fused_ms_all": [1e3 * t for t in times["fused"]],
                "feed_ms_all": [1e3 * t for t in times["feed"]],
                "reference_ms_all": [1e3 * t for t in times["reference"]],
            }
            results.append(row)
            op_only = f"{row['op_only_speedup']:.1f}x" if row["op_only_speedup"] else "n/a (feed >= total)"
            log(f"op {device} batch {batch}: fused {row['fused_ms']:.2f} ms (feed {row['feed_ms']:.2f} ms), "
                f"dense reference {row['reference_ms']:.2f} ms -> raw {row['raw_speedup']:.1f}x, "
                f"op-only {op_only}; max |fused - reference| = {max_abs_diff:.2e}")
            del fused, feed
    worst = max((r["max_abs_diff"] for r in results), default=0.0)
    worst_device_ref = max((r["reference_on_device_max_abs_diff"] for r in results), default=0.0)
    return {"results": results, "max_abs_diff": worst, "tolerance": OP_TOLERANCE,
            "correct": worst <= OP_TOLERANCE and worst_device_ref <= OP_TOLERANCE,
            "reference_on_device_max_abs_diff": worst_device_ref,
            "layout": "WH", "output_size": [1, 1], "k": 5, "grid": [15, 15],
            "notes": "fused/feed/reference each take host arrays and return a host tensor; "
                     "op_ms = fused_ms - feed_ms; raw_speedup = reference/fused; "
                     "op_only_speedup = reference/op"}


# ------------------------------------------------------------------------------------------------
# Throughput benchmark
# ------------------------------------------------------------------------------------------------
def parse_contenders(text: str) -> List[str]:
    chosen = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item not in _ALIASES:
            raise BenchError(f"unknown contender {item!r}; choose from {', '.join(CONTENDERS)}")
        if _ALIASES[item] not in chosen:
            chosen.append(_ALIASES[item])
    if not chosen:
        raise BenchError("no contender chosen")
    return chosen


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _op_devices(choice: str) -> List[str]:
    if choice == "cpu":
        return ["cpu"]
    devices = ["cpu"]
    if _gpu_available():
        from .plugin import load_plugin

        if load_plugin().get("cuda"):
            devices.append("gpu")
        elif choice == "all":
            raise BenchError("--op-devices all: the plugin has no CUDA backend")
    elif choice == "all":
        raise BenchError("--op-devices all needs a CUDA GPU")
    return devices


def run_throughput(args) -> dict:
    """The throughput benchmark for parsed ``args`` (see :func:`add_arguments`); returns the result
    dict, written with its chart and markdown table to ``args.out_dir``."""
    from .config import DataConfig

    device = args.device
    if device == "auto":
        device = "gpu" if _gpu_available() else "cpu"
    if device == "gpu" and not _gpu_available():
        raise BenchError("--device gpu needs a CUDA GPU that torch can see")
    contenders = parse_contenders(args.contenders)
    loaders = [c for c in contenders if c != "op"]
    if loaders and args.images < args.batch_size:
        raise BenchError(f"--images {args.images} do not fill one batch of {args.batch_size}")
    machine_start = machine_info()
    started = time.time()
    result = {
        "benchmark": "throughput", "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device, "machine": machine_start, "versions": versions(), "arguments": _jsonable(vars(args)),
        "contenders": {}, "ratios": {}, "op_microbenchmark": None, "op_speedups": {},
    }
    if loaders:
        data = prepare_image_set(args.data_dir, args.images, args.classes, seed=args.seed,
                                 jpeg_kb=args.jpeg_kb, workers=args.gen_workers)
        result["data"] = dict(data.manifest, path=data.root)
        config = DataConfig(image_size=args.image_size, num_threads=args.threads, py_num_workers=args.workers,
                            hw_decoder_load=args.hw_decoder_load, seed=args.seed)
        batches_per_epoch = args.images // args.batch_size
        timed = args.batches or max(1, batches_per_epoch)
        warmup = args.warmup if args.warmup is not None else max(2, batches_per_epoch)
        built: List[Contender] = []
        # The DataLoader forks its workers before any DALI pipeline (and its threads) exists.
        order = [c for c in ("authors", "relabel", "plain") if c in loaders]
        for key in order:
            t0 = time.time()
            if key == "authors":
                c = make_authors(data, config, args.batch_size, device, args.dataloader_workers or args.workers)
            elif key == "relabel":
                c = make_relabel(data, config, args.batch_size, device)
            else:
                c = make_plain_dali(data, config, args.batch_size, device)
            _take(c, 1)  # starts workers / builds pipelines
            _log(f"built {c.name} in {time.time() - t0:.1f} s")
            built.append(c)
        key_of = {name: key for key, name in CONTENDER_NAMES.items()}
        built.sort(key=lambda c: loaders.index(key_of[c.name]))  # time them in the order asked for
        for c in built:
            _take(c, warmup)
        _log(f"warm-up done ({warmup} batches each); timing {timed} batches of {args.batch_size} per "
             f"repeat, {args.repeats} repeats, alternating {' '.join(c.name for c in built)}")
        rates: Dict[str, List[float]] = {c.name: [] for c in built}
        for repeat in range(args.repeats):
            line = []
            for c in built:
                rate = time_segment(c, timed, device)
                rates[c.name].append(rate)
                line.append(f"{c.name} {rate:.1f}")
            _log(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(line) + " images/s")
        for c in built:
            entry = dict(_summary(rates[c.name]), label=CONTENDER_LABELS[c.name], unit="images/s",
                         batch_size=args.batch_size, timed_batches=timed, untimed_drain_batches=c.drain)
            if c.check is not None and c.last_batch is not None:
                entry["soft_target_sum_max_error"] = c.check(c.last_batch)
            result["contenders"][c.name] = entry
        medians = {name: entry["median"] for name, entry in result["contenders"].items()}
        if "dali-relabel" in medians and "plain-dali" in medians:
            result["ratios"]["relabel_over_plain"] = medians["dali-relabel"] / medians["plain-dali"]
        if "dali-relabel" in medians and "authors" in medians:
            result["ratios"]["relabel_over_authors"] = medians["dali-relabel"] / medians["authors"]
        result["method"] = {
            "order": "alternating, one segment per contender per repeat",
            "warmup_batches": warmup, "timed_batches_per_repeat": timed,
            "batches_per_epoch": batches_per_epoch,
            "drain": "before each timed segment the batches a contender prepared while the others ran are "
                     "taken untimed (2 x prefetch depth for DALI, 2 x workers for the DataLoader)",
            "epochs": "contenders run epoch after epoch; epoch boundaries inside a segment are timed",
        }
        for c in built:  # stop the DataLoader's workers and let the pipelines go before the op benchmark
            c.stream.close()
        del built, c
        import gc

        gc.collect()
    if "op" in contenders:
        sizes = [int(s) for s in str(args.op_batch_sizes).split(",") if s.strip()]
        result["op_microbenchmark"] = run_op_benchmark(sizes, _op_devices(args.op_devices), args.classes,
                                                       args.op_repeats or args.repeats, args.threads,
                                                       seed=args.seed)
        for row in result["op_microbenchmark"]["results"]:
            result["op_speedups"].setdefault(row["device"], {})[str(row["batch_size"])] = {
                "raw": row["raw_speedup"], "op_only": row["op_only_speedup"]}
    result["load_average_end"] = _load_average()
    result["wall_seconds"] = round(time.time() - started, 1)
    result["warnings"] = noise_warnings(result, {n: e["spread_pct"] for n, e in result["contenders"].items()})
    write_throughput_outputs(result, args.out_dir)
    return result


def noise_warnings(result: dict, spreads: Dict[str, Optional[float]], spread_limit: float = 20.0) -> List[str]:
    """Reasons to distrust a run: a busy machine (1-minute load average above a quarter of the cores
    when the run started; at the end it includes the benchmark's own load, so it is only recorded)
    or a large spread between repeats."""
    found = []
    cores = result["machine"].get("usable_cores") or result["machine"].get("cpu_count") or 1
    load = (result["machine"].get("load_average") or [0])[0]
    if load > 0.25 * cores:
        found.append(f"load average {load:.2f} on {cores} cores when the run started: the machine was busy")
    for name, spread in spreads.items():
        if spread is not None and spread > spread_limit:
            found.append(f"{name}: repeats spread {spread:.0f} % of the median")
    return found


def _load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _jsonable(values: dict) -> dict:
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def write_outputs(result: dict, out_dir: str, name: str, latest: str, plot, markdown) -> None:
    """``<name>-<date>.json`` + ``.png`` (drawn by ``plot``) and the table ``latest`` (from ``markdown``)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}-{_date()}")
    result["files"] = {"json": stem + ".json", "png": stem + ".png", "markdown": os.path.join(out_dir, latest)}
    plot(result, result["files"]["png"])
    table = markdown(result)
    with open(result["files"]["markdown"], "w") as f:
        f.write(table)
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=2)
    print(table)
    _log(f"wrote {result['files']['json']}, {result['files']['png']} and {result['files']['markdown']}")


def write_throughput_outputs(result: dict, out_dir: str) -> None:
    write_outputs(result, out_dir, f"throughput-{result['device']}", f"latest-{result['device']}.md",
                  plot_throughput, throughput_markdown)


def _fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def throughput_markdown(result: dict) -> str:
    m, v, a = result["machine"], result["versions"], result["arguments"]
    gib = (m.get("memory_bytes") or 0) / 2**30
    lines = [f"# Throughput, {result['device']}, {result['created'][:10]}", "",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} usable cores, {gib:.0f} GiB"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m.get('load_average') or [])}.",
             f"Versions: torch {v.get('torch')}, torchvision {v.get('torchvision')}, DALI {v.get('dali')}, "
             f"dali-relabel {v.get('dali_relabel')}" + (f" ({v['git_commit'][:10]}"
                                                      f"{', dirty' if v.get('git_dirty') else ''})"
                                                      if v.get("git_commit") else "") + ".", ""]
    if result["contenders"]:
        d = result.get("data", {})
        lines += [f"Settings: batch {a.get('batch_size')}, crop {a.get('image_size')}, DALI threads "
                  f"{a.get('threads')}, workers {a.get('workers')}, {a.get('repeats')} repeats of "
                  f"{result['method']['timed_batches_per_repeat']} batches, {d.get('num_images')} JPEGs "
                  f"(mean {d.get('mean_jpeg_bytes', 0) / 1000:.0f} KB, about "
                  f"{d.get('mean_image_hw', [0, 0])[1]:.0f}x{d.get('mean_image_hw', [0, 0])[0]:.0f}), "
                  f"{d.get('num_classes')} classes.", "",
                  "| contender | median images/s | min | max | vs plain DALI |",
                  "|---|---:|---:|---:|---:|"]
        plain = result["contenders"].get("plain-dali", {}).get("median")
        for name, entry in result["contenders"].items():
            versus = f"{entry['median'] / plain:.2f}x" if plain else "n/a"
            lines.append(f"| {entry['label']} | {_fmt(entry['median'])} | {_fmt(entry['min'])} | "
                         f"{_fmt(entry['max'])} | {versus} |")
        r = result["ratios"]
        lines += ["", "dali-relabel / plain DALI: " + _fmt(r.get("relabel_over_plain"), 2)
                  + "; dali-relabel / authors' approach: " + _fmt(r.get("relabel_over_authors"), 2), ""]
    op = result.get("op_microbenchmark")
    if op:
        lines += [f"Operator ({op['results'][0]['num_classes'] if op['results'] else ''} classes, 5x15x15 "
                  f"maps, 1x1 targets): max |fused - reference| = {op['max_abs_diff']:.2e} "
                  f"({'ok' if op['correct'] else 'ABOVE TOLERANCE'}).", "",
                  "| device | batch | fused ms | feed ms | op ms | dense reference ms | raw speedup | "
                  "op-only speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in op["results"]:
            lines.append(f"| {row['device']} | {row['batch_size']} | {row['fused_ms']:.2f} | {row['feed_ms']:.2f} | "
                         f"{row['op_ms']:.2f} | {row['reference_ms']:.2f} | {row['raw_speedup']:.1f}x | "
                         f"{_fmt(row['op_only_speedup'])}x |")
        lines.append("")
    lines += _warning_lines(result)
    return "\n".join(lines) + "\n"


def _warning_lines(result: dict) -> List[str]:
    if not result.get("warnings"):
        return []
    return ["**Noisy run:** " + "; ".join(result["warnings"]) + ".", ""]


def plot_throughput(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["contenders"])
    if names:
        medians = [result["contenders"][n]["median"] for n in names]
        low = [result["contenders"][n]["median"] - result["contenders"][n]["min"] for n in names]
        high = [result["contenders"][n]["max"] - result["contenders"][n]["median"] for n in names]
        colours = {"plain-dali": "#999999", "dali-relabel": "#76b900", "authors": "#1f77b4"}
        bars = left.bar(range(len(names)), medians, yerr=[low, high], capsize=6,
                        color=[colours.get(n, "#555555") for n in names])
        left.set_xticks(range(len(names)))
        left.set_xticklabels(names)
        for bar, value in zip(bars, medians):  # inside the bar, clear of the error bar
            left.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value / 2), ha="center",
                          va="center", color="white", fontweight="bold")
        left.set_ylabel("images/s (median, bars: min-max)")
    else:
        left.text(0.5, 0.5, "loaders not measured", ha="center", va="center", transform=left.transAxes)
    left.set_title(f"training-loader throughput ({result['device']}, batch "
                   f"{result['arguments'].get('batch_size')})")
    op = result.get("op_microbenchmark")
    if op and op["results"]:
        rows = op["results"]
        x = np.arange(len(rows))
        raw = [r["raw_speedup"] for r in rows]
        only = [r["op_only_speedup"] or 0.0 for r in rows]
        for offset, values, label in ((-0.2, raw, "raw (reference / fused call)"),
                                      (0.2, only, "op only (reference / (fused - feed))")):
            bars = right.bar(x + offset, values, 0.4, label=label)
            for bar, value in zip(bars, values):
                if value > 0:
                    right.annotate(f"{value:.0f}x" if value >= 10 else f"{value:.1f}x",
                                   (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                                   xytext=(0, 2), textcoords="offset points", fontsize=8)
        right.set_xticks(x)
        right.set_xticklabels([f"{r['device']}\nB={r['batch_size']}" for r in rows])
        right.axhline(1.0, color="black", linewidth=0.8)
        right.set_yscale("log")
        right.set_ylim(0.8, max(raw + only + [10.0]) * 4)  # room for the labels and the legend
        right.set_ylabel("speedup over the dense reference")
        right.legend(fontsize=8, loc="upper left")
    else:
        right.text(0.5, 0.5, "operator not measured", ha="center", va="center", transform=right.transAxes)
    right.set_title("fused operator vs dense scatter + roi_align")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Store read vs per-image .pt files
# ------------------------------------------------------------------------------------------------
STORE_METHODS = ("pt-files", "store-sorted", "store-unsorted")


def _evict(path: str) -> bool:
    """Drop ``path``'s pages from the page cache (``posix_fadvise DONTNEED``); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_store_rows(rows: int, batch: int, repeats: int) -> None:
    needed = 2 * len(STORE_METHODS) * repeats * batch + 1
    if rows < needed:
        raise BenchError(f"--store-rows {rows} is too small: {repeats} repeats x {len(STORE_METHODS)} methods "
                         f"x 2 cache modes x {batch} rows (+ row 0) need {needed} distinct rows")


def prepare_store_read(data_dir: str, rows: int, batch: int, repeats: int, num_classes: int = 1000,
                       seed: int = 0, k: int = 5, grid: int = 15, chunk_rows: int = 4096,
                       log: Callable[[str], None] = _log):
    """A store of ``rows`` random maps (written in chunks) and ``.pt`` files for the rows that
    the ``pt-files`` measurements read; returns ``(root, store_path, row_sets)`` where
    ``row_sets[cache][method][repeat]`` is a batch of distinct rows no other measurement reads."""
    from .store import StoreWriter

    _check_store_rows(rows, batch, repeats)
    root = os.path.join(data_dir, f"store-read-r{rows}-c{num_classes}-k{k}-g{grid}-s{seed}-v{DATA_VERSION}")
    store_path = os.path.join(root, "store.h5")
    maps_dir = os.path.join(root, "maps")
    permutation = np.random.default_rng([seed, 2]).permutation(rows - 1) + 1  # row 0 is read untimed
    row_sets, start = {}, 0
    for cache in ("page-cached", "evicted"):
        row_sets[cache] = {}
        for method in STORE_METHODS:
            row_sets[cache][method] = []
            for _ in range(repeats):
                row_sets[cache][method].append(permutation[start:start + batch])
                start += batch
    pt_rows = sorted({int(r) for cache in row_sets for rs in row_sets[cache]["pt-files"] for r in rs})
    marker = os.path.join(root, f"pt-b{batch}-r{repeats}.done")
    if not os.path.exists(store_path):
        log(f"writing a {rows}-row store in chunks of {chunk_rows} rows -> {store_path}")
        os.makedirs(root, exist_ok=True)
        paths = [f"{class_name(r % num_classes)}/{class_name(r % num_classes)}_{r:07d}.JPEG" for r in range(rows)]
        writer = StoreWriter(store_path, paths, num_classes, k, grid, grid, layout="WH",
                             class_names=[class_name(c) for c in range(num_classes)], source="benchmark",
                             teacher="random", resume=False)
        try:
            for begin in range(0, rows, chunk_rows):
                count = min(chunk_rows, rows - begin)
                logits, ids = random_topk_maps(np.random.default_rng([seed, 3, begin]), count, k, grid, grid,
                                               num_classes)
                writer.write(begin, logits, ids, np.arange(begin, begin + count) % num_classes,
                             np.tile([375, 500], (count, 1)))
            writer.finish()
        except BaseException:
            writer.close()
            raise
        _fsync(store_path)
    if not os.path.exists(marker):
        from .store import LabelStore

        log(f"writing {len(pt_rows)} per-image .pt files (authors' format) -> {maps_dir}")
        with LabelStore(store_path, verify="header") as store:
            maps = store.read(pt_rows)
            for i, row in enumerate(pt_rows):
                path = os.path.join(maps_dir, f"{row:07d}.pt")
                write_release_map(path, maps.logits[i], maps.class_ids[i])
                _fsync(path)
        open(marker, "w").close()
    return root, store_path, maps_dir, row_sets


def run_store_read(args) -> dict:
    """Random batches from the HDF5 store vs ``torch.load`` of per-image ``.pt`` files."""
    rows, batch, repeats = args.store_rows, args.store_batch, args.repeats
    _check_store_rows(rows, batch, repeats)
    machine_start = machine_info()  # before generating anything: its load average is the machine's
    import gc

    import torch

    from .store import LabelStore

    torch.set_num_threads(1)
    root, store_path, maps_dir, row_sets = prepare_store_read(args.data_dir, rows, batch, repeats,
                                                             num_classes=args.classes, seed=args.seed)
    started = time.time()
    result = {"benchmark": "store-read", "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_start, "versions": versions(), "arguments": _jsonable(vars(args)),
              "store": {"path": store_path, "rows": rows, "file_bytes": os.path.getsize(store_path),
                        "bytes_per_image": os.path.getsize(store_path) / rows},
              "batch_size": batch, "results": {}, "ratios": {}}
    pt_sizes = [os.path.getsize(os.path.join(maps_dir, f)) for f in os.listdir(maps_dir)[:256]]
    result["pt_bytes_per_image"] = float(np.mean(pt_sizes))

    def load_pt(batch_rows):
        tensors = [torch.load(os.path.join(maps_dir, f"{int(r):07d}.pt"), map_location="cpu", weights_only=True)
                   for r in batch_rows]
        return torch.stack(tensors)

    store = LabelStore(store_path, verify="header")
    store.read([0])
    evict_ok = True
    times = {cache: {m: [] for m in STORE_METHODS} for cache in row_sets}
    for cache in ("page-cached", "evicted"):
        for repeat in range(repeats):
            methods = STORE_METHODS[repeat % 3:] + STORE_METHODS[:repeat % 3]  # rotate who goes first
            for method in methods:
                batch_rows = row_sets[cache][method][repeat]
                if method == "store-sorted":
                    batch_rows = np.sort(batch_rows)
                if cache == "evicted":
                    if method == "pt-files":
                        for r in batch_rows:
                            evict_ok &= _evict(os.path.join(maps_dir, f"{int(r):07d}.pt"))
                    else:
                        store.close()
                        gc.collect()
                        evict_ok &= _evict(store_path)
                        store = LabelStore(store_path, verify="header")
                        store.read([0])  # opens and maps the file; row 0 is never timed
                start = time.perf_counter()
                if method == "pt-files":
                    out = load_pt(batch_rows)
                    assert out.shape[0] == len(batch_rows)
                else:
                    maps = store.read(batch_rows)
                    assert len(maps.logits) == len(batch_rows)
                times[cache][method].append(1e3 * (time.perf_counter() - start))
        for method in STORE_METHODS:
            result["results"].setdefault(cache, {})[method] = dict(_summary(times[cache][method]), unit="ms")
        pt = result["results"][cache]["pt-files"]["median"]
        result["ratios"][cache] = {
            "pt_over_store_sorted": pt / result["results"][cache]["store-sorted"]["median"],
            "pt_over_store_unsorted": pt / result["results"][cache]["store-unsorted"]["median"]}
        _log(f"{cache}: " + ", ".join(f"{m} {result['results'][cache][m]['median']:.2f} ms" for m in STORE_METHODS))
    store.close()
    result["evicted_with_posix_fadvise"] = evict_ok
    result["notes"] = ("every measurement reads a batch of rows no other measurement reads; "
                       "'evicted' drops the file pages with posix_fadvise(DONTNEED) before each measurement "
                       "(works only for clean, unmapped pages); pt-files = torch.load of each file + torch.stack")
    result["load_average_end"] = _load_average()
    result["wall_seconds"] = round(time.time() - started, 1)
    result["warnings"] = noise_warnings(result, {f"{c} {m}": e["spread_pct"] for c, ms in result["results"].items()
                                                 for m, e in ms.items() if e["median"] >= 10.0},
                                        spread_limit=50.0)  # sub-10-ms timings jitter by nature
    write_outputs(result, args.out_dir, "store-read", "latest-store-read.md", plot_store_read,
                  store_read_markdown)
    return result


def store_read_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Store read vs per-image .pt files, {result['created'][:10]}", "",
             f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} usable cores; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m.get('load_average') or [])}.",
             f"Batch of {result['batch_size']} random rows from a {result['store']['rows']}-row store "
             f"({result['store']['bytes_per_image']:.0f} bytes/image) vs torch.load of "
             f"{result['batch_size']} .pt files ({result['pt_bytes_per_image']:.0f} bytes/image), "
             f"{result['arguments'].get('repeats')} repeats, different rows every time.", "",
             "| page cache | .pt files ms | store sorted ms | store unsorted ms | .pt / sorted | .pt / unsorted |",
             "|---|---:|---:|---:|---:|---:|"]
    for cache, methods in result["results"].items():
        ratio = result["ratios"][cache]
        lines.append(f"| {cache} | {methods['pt-files']['median']:.2f} | {methods['store-sorted']['median']:.2f} | "
                     f"{methods['store-unsorted']['median']:.2f} | {ratio['pt_over_store_sorted']:.1f}x | "
                     f"{ratio['pt_over_store_unsorted']:.1f}x |")
    lines += [""] + _warning_lines(result)
    return "\n".join(lines) + "\n"


def plot_store_read(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    caches = list(result["results"])
    x = np.arange(len(caches))
    for i, method in enumerate(STORE_METHODS):
        med = [result["results"][c][method]["median"] for c in caches]
        err = [[result["results"][c][method]["median"] - result["results"][c][method]["min"] for c in caches],
               [result["results"][c][method]["max"] - result["results"][c][method]["median"] for c in caches]]
        ax.bar(x + (i - 1) * 0.27, med, 0.27, yerr=err, capsize=4, label=method)
    ax.set_xticks(x)
    ax.set_xticklabels(caches)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per batch of {result['batch_size']} (median)")
    ax.set_title("label maps: HDF5 store vs per-image .pt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command line (shared by `dali-relabel bench` and benchmarks/run.py)
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--store-read", action="store_true",
                        help="run the store-read benchmark (HDF5 rows vs per-image .pt) instead")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu",
                        help="where the loaders decode and pool (gpu: mixed decoder, CUDA operator)")
    parser.add_argument("--contenders", default="plain,relabel,authors,op",
                        help="comma-separated subset of plain, relabel, authors, op")
    parser.add_argument("--images", type=int, default=2048, help="images in the generated set")
    parser.add_argument("--classes", type=int, default=1000, help="classes (folders and map classes)")
    parser.add_argument("--jpeg-kb", type=float, default=110.0, help="target mean JPEG size in KB")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="DALI CPU threads (default: the usable cores)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DALI py workers of dali-relabel and DataLoader workers of the authors' loader")
    parser.add_argument("--dataloader-workers", type=int, default=None,
                        help="override the DataLoader's workers (default: --workers)")
    parser.add_argument("--hw-decoder-load", type=float, default=0.65,
                        help="share of JPEGs for the GPU's hardware decoder (--device gpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed segments per contender")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per segment (default: one epoch, images // batch size)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches per contender before timing (default: one epoch, at least 2)")
    parser.add_argument("--op-batch-sizes", default="64,256,1024", help="batch sizes of the operator benchmark")
    parser.add_argument("--op-devices", choices=["auto", "cpu", "all"], default="auto",
                        help="operator benchmark devices: auto = cpu and, if present, gpu")
    parser.add_argument("--op-repeats", type=int, default=None, help="operator measurements (default: --repeats)")
    parser.add_argument("--store-rows", type=int, default=32768, help="rows of the store-read store")
    parser.add_argument("--store-batch", type=int, default=256, help="rows per store-read batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.path.join("benchmarks", ".data"),
                        help="where generated data is cached and reused")
    parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"),
                        help="where the JSON, PNG and markdown results go")
    parser.add_argument("--gen-workers", type=int, default=None, help="processes generating JPEGs")
    return parser


def run_from_args(args) -> dict:
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    for name in ("images", "classes", "batch_size", "repeats", "threads", "image_size", "store_rows",
                 "store_batch"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be positive")
    if args.store_read:
        return run_store_read(args)
    return run_throughput(args)
