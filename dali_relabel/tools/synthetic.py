"""A small synthetic multi-object image set with exact masks, and its oracle label store.

Each image shows 1-3 objects of different classes (a class is a colour and a shape) at random
positions and scales on a textured background, so a random crop often misses the object that gave
the image its single label, the situation ReLabel is for. The single label is the class with the
largest visible area. Because the generator knows every pixel's class, it can write an **oracle**
store: per grid cell, the top-k classes by visible area, with logits proportional to that area.
"""
from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..store import StoreWriter

SHAPES = ("box", "disk", "triangle")
BACKGROUND = -1


@dataclass
class SyntheticImage:
    relpath: str
    label: int
    mask: np.ndarray  # [H, W] class index per pixel, -1 for background


def class_name(c: int) -> str:
    return f"obj{c:03d}_{SHAPES[c % len(SHAPES)]}"


def class_colour(c: int, num_classes: int) -> Tuple[int, int, int]:
    hue = (c * 0.61803398875) % 1.0  # golden-ratio hues stay apart for any class count
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "box":
        draw.rectangle(box, fill=fill)
    elif shape == "disk":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_image(rng: np.random.Generator, num_classes: int, size: Tuple[int, int], max_objects: int = 3):
    """One image and its class mask: ``(rgb uint8 [H, W, 3], mask int16 [H, W])``."""
    height, width = size
    # A gray texture with a faint tint: structure to ignore, but no colour that names a class.
    shade = rng.normal(110, 30, size=(height // 8 + 1, width // 8 + 1, 1))
    tint = rng.normal(0, 6, size=(1, 1, 3))
    background = (shade + tint).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(background).resize((width, height), Image.BILINEAR)
    mask_img = Image.new("I", (width, height), BACKGROUND)
    draw, mask_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask_img)
    count = int(rng.integers(1, max_objects + 1))
    for c in rng.choice(num_classes, size=count, replace=False):
        side = rng.uniform(0.2, 0.6) * min(height, width)
        aspect = rng.uniform(0.75, 1.33)
        w, h = side * aspect, side / aspect
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (x0, y0, x0 + w, y0 + h)
        shade = rng.uniform(0.8, 1.0)
        colour = tuple(int(v * shade) for v in class_colour(int(c), num_classes))
        _draw_object(draw, SHAPES[int(c) % len(SHAPES)], box, colour)
        _draw_object(mask_draw, SHAPES[int(c) % len(SHAPES)], box, int(c))
    mask = np.asarray(mask_img, dtype=np.int32).astype(np.int16)
    return np.asarray(canvas), mask


def generate_image_set(root, num_classes: int = 10, images_per_class: int = 20, seed: int = 0,
                       size_range: Tuple[int, int] = (96, 160), quality: int = 90) -> List[SyntheticImage]:
    """Write ``root/<class>/<n>.JPEG`` with ``images_per_class`` images whose largest object is
    that class; returns the images with their masks, in sorted path order."""
    rng = np.random.default_rng(seed)
    names = [class_name(c) for c in range(num_classes)]
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    counts = [0] * num_classes
    images: List[SyntheticImage] = []
    while min(counts) < images_per_class:
        size = tuple(int(s) for s in rng.integers(size_range[0], size_range[1] + 1, size=2))
        rgb, mask = render_image(rng, num_classes, size)
        areas = np.bincount(mask[mask >= 0].ravel(), minlength=num_classes)
        if areas.sum() == 0:
            continue
        label = int(areas.argmax())
        if counts[label] >= images_per_class:
            continue
        relpath = f"{names[label]}/{counts[label]:05d}.JPEG"
        Image.fromarray(rgb).save(os.path.join(root, relpath), quality=quality)
        counts[label] += 1
        images.append(SyntheticImage(relpath, label, mask))
    images.sort(key=lambda im: im.relpath)
    return images


def oracle_map(mask: np.ndarray, num_classes: int, k: int = 5, grid: int = 15, scale: float = 8.0):
    """Top-k classes per cell by visible area: ``(logits [k, grid, grid], class_ids [k, grid, grid])``.

    A class's logit is ``scale`` times the fraction of the cell it covers; slots beyond the classes
    present hold other classes with logit 0 (the value every absent class has anyway).
    """
    k = min(k, num_classes)
    height, width = mask.shape
    ys = np.minimum((np.arange(height) * grid) // height, grid - 1)
    xs = np.minimum((np.arange(width) * grid) // width, grid - 1)
    cell = ys[:, None] * grid + xs[None, :]
    counts = np.zeros((grid * grid, num_classes + 1))
    np.add.at(counts, (cell.ravel(), mask.ravel() + 1), 1)  # column 0 is background
    fractions = counts[:, 1:] / counts.sum(axis=1, keepdims=True)
    order = np.argsort(-fractions, axis=1, kind="stable")[:, :k]
    logits = np.take_along_axis(fractions, order, axis=1) * scale
    return (logits.T.reshape(k, grid, grid).astype(np.float16),
            order.T.reshape(k, grid, grid).astype(np.int64))


def write_oracle_store(path, images: Sequence[SyntheticImage], num_classes: int, k: int = 5,
                       grid: int = 15) -> str:
    """The oracle store of a generated set (layout ``"HW"``)."""
    k = min(k, num_classes)
    writer = StoreWriter(path, [im.relpath for im in images], num_classes, k, grid, grid, layout="HW",
                         class_names=[class_name(c) for c in range(num_classes)], teacher="oracle",
                         source="oracle", resume=False)
    maps = [oracle_map(image.mask, num_classes, k, grid) for image in images]
    writer.write(0, np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]),
                 [im.label for im in images], [im.mask.shape for im in images])
    return writer.finish()


def visible_classes(image: SyntheticImage, min_fraction: float = 0.03) -> List[int]:
    """Classes covering at least ``min_fraction`` of the image: its multi-label (ReaL-style) truth."""
    counts = np.bincount(image.mask[image.mask >= 0].ravel(), minlength=1)
    present = np.nonzero(counts >= min_fraction * image.mask.size)[0]
    return sorted(set(int(c) for c in present) | {image.label})


def write_real_labels(path, images: Sequence[SyntheticImage], min_fraction: float = 0.03) -> str:
    """``real.json``: per image in sorted file order, the classes visibly present."""
    import json

    with open(path, "w") as f:
        json.dump([visible_classes(image, min_fraction) for image in images], f)
    return path
