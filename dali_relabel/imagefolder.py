"""Listing an ImageFolder tree (``root/<class>/<image>``) in a fixed, sorted order: on a local disk,
or under an ``s3://`` prefix (listed through :mod:`dali_relabel.remote`, in the same order)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

from . import remote

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
        return remote.join(self.root, self.relpaths[i]) if remote.is_remote(self.root) \
            else os.path.join(self.root, self.relpaths[i])


def list_images(root, classes: Sequence[str] = None) -> ImageList:
    """Walk ``root/<class>/...`` (one level of class folders, files possibly nested below).

    Args:
        root: the tree's root: a directory or an ``s3://bucket/prefix``.
        classes: class names in label order; defaults to the sorted folder names. Folders not in
            ``classes`` are an error, so a tree never silently loses a class.
    """
    root = os.fspath(root)
    if remote.is_remote(root):
        folders, files = _remote_tree(root)
    else:
        folders, files = _local_tree(root)
    if classes is None:
        classes = folders
    index = {name: i for i, name in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(f"{root}: class folder {unknown[0]!r} is not among the {len(classes)} known "
                         f"classes ({len(unknown)} such folders)")
    relpaths = [rel for rel in files if rel.lower().endswith(IMAGE_EXTENSIONS)]
    labels = [index[rel.split("/", 1)[0]] for rel in relpaths]
    if not relpaths:
        raise ValueError(f"{root}: no images found (expected {root}/<class>/<image>.JPEG)")
    return ImageList(root, list(classes), relpaths, labels)


def _local_tree(root: str):
    """``(class folders, files under them)`` of a local tree, files in ``os.walk`` order (each
    folder's files by name, then its subfolders by name)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root {root} is not a directory")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            for name in sorted(filenames):
                files.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return folders, files


def _walk_order(relpath: str):
    """Sort key that puts object keys in the local walk's order: at every level files before
    folders, each by name."""
    parts = relpath.split("/")
    return tuple((1, part) for part in parts[:-1]) + ((0, parts[-1]),)


def _remote_tree(root: str):
    """``(class folders, files under them)`` of the tree under an ``s3://`` prefix, in the order
    :func:`_local_tree` gives the same tree on a disk."""
    listed = remote.list_objects(root)
    if not listed:
        raise FileNotFoundError(f"image root {root}: no objects under this prefix")
    keys = [key for key in listed if "/" in key and not key.endswith("/")]
    folders = sorted({key.split("/", 1)[0] for key in keys if not key.startswith(".")})
    kept = set(folders)
    return folders, sorted((key for key in keys if key.split("/", 1)[0] in kept), key=_walk_order)
