"""Listing an ImageFolder tree (``root/<class>/<image>``) in a fixed, sorted order."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ImageList:
    """The images of a tree: ``relpaths[i]`` (``'<class>/<file>'``) has label ``labels[i]``."""

    root: str
    classes: List[str]
    relpaths: List[str]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpaths[i])


def list_images(root, classes: Sequence[str] = None) -> ImageList:
    """Walk ``root/<class>/...`` (one level of class folders, files possibly nested below).

    Args:
        root: the tree's root.
        classes: class names in label order; defaults to the sorted folder names. Folders not in
            ``classes`` are an error, so a tree never silently loses a class.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root {root} is not a directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = folders
    index = {name: i for i, name in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(f"{root}: class folder {unknown[0]!r} is not among the {len(classes)} known "
                         f"classes ({len(unknown)} such folders)")
    relpaths, labels = [], []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    relpaths.append(rel.replace(os.sep, "/"))
                    labels.append(index[folder])
    if not relpaths:
        raise ValueError(f"{root}: no images found (expected {root}/<class>/<image>.JPEG)")
    return ImageList(root, list(classes), relpaths, labels)
