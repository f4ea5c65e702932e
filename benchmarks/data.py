"""Generated benchmark data: ImageNet-like JPEGs, random top-k label maps, their store and the same
maps as the authors' per-image ``.pt`` files; random operator inputs.

:func:`prepare_image_set` writes (once; later runs reuse it) an ImageFolder tree of photo-like JPEGs
of about 500x375 px and ``jpeg_kb`` KB at quality 90, a label store (layout ``"WH"``) of random top-5
15x15 maps, and ``maps/<class>/<stem>.pt`` in the release format. The folder name holds every
setting that changes the data (``imagenet-like-n2048-c1000-s0-q90-kb110-v1``); ``DATA_VERSION``
changes when the generator does.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .common import BenchError, log

DATA_VERSION = 1


def open_store(path: str, scan: bool = False):
    """A :class:`~dali_relabel.store.LabelStore` that checks only the header at open unless ``scan``
    (the store-read suite evicts the file from the page cache and must not have it read back)."""
    from dali_relabel.store import LabelStore

    return LabelStore(path, verify="full" if scan else "header")


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


def _store_version(path: str) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs.get("format_version", -1))
    except OSError:
        return -1


def _jpeg_hw(path: str):
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.height, image.width


def _write_manifest(path: str, manifest: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)


def _write_store(data: BenchData, relpaths, logits, class_ids, sizes) -> None:
    """The store of the set: rows in ``list_images`` order, layout ``"WH"``, labels from the folders."""
    from dali_relabel.store import write_store

    order = sorted(range(len(relpaths)), key=lambda i: relpaths[i])
    labels = np.arange(len(relpaths)) % data.num_classes
    tmp = data.store_path + ".tmp"
    write_store(tmp, [relpaths[i] for i in order], logits[order], class_ids[order], data.num_classes,
                class_names=[class_name(c) for c in range(data.num_classes)], layout="WH",
                labels=labels[order], image_sizes=sizes[order], source="benchmark", teacher="random")
    os.replace(tmp, data.store_path)


def prepare_image_set(data_dir: str, num_images: int = 2048, num_classes: int = 1000, seed: int = 0,
                      quality: int = 90, jpeg_kb: float = 110.0, k: int = 5, grid: int = 15,
                      workers: Optional[int] = None, log: Callable[[str], None] = log) -> BenchData:
    """Generate (or reuse) the benchmark image set under ``data_dir``.

    Images are photo-like JPEGs around 500x375 (each side within +-30 %) at ``quality``, about
    ``jpeg_kb`` KB on average, spread round-robin over ``num_classes`` folders ``n00000000 ...``
    (only folders that receive an image are created). The store holds random top-``k``
    ``grid x grid`` maps over ``num_classes`` classes with distinct ids per cell, layout ``"WH"``;
    ``maps/<class>/<stem>.pt`` holds the same maps in the authors' release format.
    """
    from dali_relabel.tools.convert import map_relpath
    from dali_relabel.store import FORMAT_VERSION

    if num_images < 1 or num_classes < k:
        raise BenchError(f"need at least 1 image and num_classes >= k={k} (got {num_images}, {num_classes})")
    root = image_set_dir(data_dir, num_images, num_classes, seed, quality, jpeg_kb)
    manifest_path = os.path.join(root, "manifest.json")
    data = BenchData(root, os.path.join(root, "images"), os.path.join(root, "store.h5"),
                     os.path.join(root, "maps"), num_images, num_classes, {})
    relpaths = [f"{class_name(i % num_classes)}/{class_name(i % num_classes)}_{i:07d}.JPEG"
                for i in range(num_images)]
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            data.manifest = json.load(f)
        log(f"reusing the image set {root}: {num_images} images, mean JPEG "
            f"{data.manifest['mean_jpeg_bytes'] / 1000:.1f} KB, {num_classes} classes")
        if _store_version(data.store_path) != FORMAT_VERSION:  # same maps, the current store format
            log(f"rewriting its label store in format version {FORMAT_VERSION} (images and .pt maps kept)")
            sizes = np.array([_jpeg_hw(os.path.join(data.image_root, p)) for p in relpaths], np.int32)
            logits, class_ids = random_topk_maps(np.random.default_rng([seed, 1]), num_images, k, grid, grid,
                                                 num_classes)
            _write_store(data, relpaths, logits, class_ids, sizes)
            data.manifest.update(store_bytes_per_image=os.path.getsize(data.store_path) / num_images,
                                 store_format_version=FORMAT_VERSION)
            _write_manifest(manifest_path, data.manifest)
        return data
    started = time.time()
    os.makedirs(root, exist_ok=True)
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
    _write_store(data, relpaths, logits, class_ids, sizes)
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
        "k": k, "grid": [grid, grid], "layout": "WH", "store_format_version": FORMAT_VERSION,
        "store_bytes_per_image": os.path.getsize(data.store_path) / num_images,
        "pt_bytes_per_image": float(np.mean(pt_bytes)),
        "generation_seconds": round(time.time() - started, 1),
    }
    _write_manifest(manifest_path, data.manifest)
    m = data.manifest
    log(f"wrote {num_images} JPEGs: mean {m['mean_jpeg_bytes'] / 1000:.1f} KB (median "
        f"{m['median_jpeg_bytes'] / 1000:.1f} KB, {m['min_jpeg_bytes'] / 1000:.0f}-"
        f"{m['max_jpeg_bytes'] / 1000:.0f} KB), mean size {m['mean_image_hw'][1]:.0f}x{m['mean_image_hw'][0]:.0f} "
        f"(WxH), store {m['store_bytes_per_image']:.0f} B/image, .pt {m['pt_bytes_per_image']:.0f} B/image, "
        f"in {m['generation_seconds']} s -> {root}")
    return data


def prepare_shards(data: BenchData, shard_mb: float = 32.0, log: Callable[[str], None] = log) -> str:
    """Tar shards of the image set and its store (``dali-relabel shard``), about ``shard_mb`` MB each,
    written once per store content under ``<set>/shards-<content hash>``; returns their directory."""
    from dali_relabel.shards import write_shards

    with open_store(data.store_path) as store:
        out_dir = os.path.join(data.root, f"shards-{store.header.content_sha256[:12]}")
        if os.path.exists(os.path.join(out_dir, "index.json")):
            import json
            import shutil

            from dali_relabel.shards import FORMAT_VERSION

            with open(os.path.join(out_dir, "index.json")) as f:
                if json.load(f).get("format_version") == FORMAT_VERSION:
                    return out_dir
            shutil.rmtree(out_dir)  # a cached set of an older shard format: written again
        log(f"packing the image set into tar shards of ~{shard_mb:g} MB -> {out_dir}")
        write_shards(data.image_root, store, out_dir, shard_bytes=int(shard_mb * 1e6), progress=False)
    return out_dir


def random_crop_batch(rng: np.random.Generator, batch: int, num_classes: int, k: int = 5, grid: int = 15,
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Operator inputs like the training graph's: maps, random-resized-crop windows of ~500x375
    images, image shapes ``(H, W, 3)`` and mirror flags (the store's dtypes)."""
    logits, ids = random_topk_maps(rng, batch, k, grid, grid, num_classes)
    from dali_relabel.store import class_id_dtype

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


def random_affines(rng: np.random.Generator, batch: int, height: int = 224, width: int = 224) -> np.ndarray:
    """``[B, 2, 3]`` float32 geometric ops as the operator's ``affine`` takes them (output pixel ->
    resized crop pixel) for a ``height x width`` output: about the centre, a rotation of up to 30
    degrees, a shear of up to 0.3, a scale in [0.8, 1.25] and a translation of up to 45% of the size
    (RandAugment's ranges at high magnitude), all at once."""
    out = np.empty((batch, 2, 3), np.float32)
    centre = np.array([width / 2, height / 2])
    for n in range(batch):
        angle = math.radians(rng.uniform(-30, 30))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        linear = rotation @ np.array([[1, rng.uniform(-0.3, 0.3)], [rng.uniform(-0.3, 0.3), 1]])
        linear = linear * math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        shift = rng.uniform(-0.45, 0.45, size=2) * [width, height]
        out[n, :, :2] = linear
        out[n, :, 2] = centre - linear @ centre + shift
    return out
