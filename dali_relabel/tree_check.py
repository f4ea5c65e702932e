"""Does a label store describe the images under a root? Checked once, remembered after.

Listing an ImageNet-sized tree takes seconds (1.28M files), and every rank of every run would pay it.
:func:`check_store_matches_images` lists the tree only when it has to: the result is remembered in the
user's cache under a key made of the store's content hash and the root, together with a fingerprint
of the tree's folders (their modification times and inodes change whenever a file is added, removed
or renamed in them). The next check with an unchanged fingerprint costs one ``stat`` per folder. One
process lists while the others (DDP ranks on the node) wait on a file lock and then reuse its result.

A tree under an ``s3://`` prefix has no such cheap fingerprint: it is listed at every check (one
request per 1,000 objects); pass ``check_files=False`` to the loader to skip that for a tree you trust.

The listing also refuses anything in the tree that is named like an image but is no regular file (a
FIFO would block whoever opens it; a device or socket is no image), and compares the stored image
sizes of a random sample of rows with the files' own (read from their headers, as ``generate``
records them: without EXIF rotation).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np

from . import remote
from .bad_images import file_kind
from .imagefolder import IMAGE_EXTENSIONS, list_images
from .store import LabelStore, StoreError

_CACHE_VERSION = 2
#: Rows whose stored image size is compared with the file's at each listing.
SIZE_SAMPLE_ROWS = 64


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dali_relabel", "tree-checks")


def folder_fingerprint(root: str, folders: List[str]) -> Dict[str, List[int]]:
    """``{folder: [mtime_ns, inode]}`` of ``root`` and its ``folders`` (relative); missing ones map to ``[]``."""
    found = {}
    for folder in [""] + list(folders):
        try:
            info = os.stat(os.path.join(root, folder))
            found[folder] = [info.st_mtime_ns, info.st_ino]
        except OSError:
            found[folder] = []
    return found


def _folder_lengths(paths) -> np.ndarray:
    """Length in bytes of each path's first component (the whole path if it has no ``/``)."""
    starts, ends = paths.offsets[:-1], paths.offsets[1:]
    slashes = np.append(np.flatnonzero(paths.data == ord("/")), len(paths.data))
    first_slash = slashes[np.searchsorted(slashes, starts)]
    return np.minimum(first_slash, ends) - starts


def check_labels_match_folders(store: LabelStore) -> None:
    """Every row with a known label lies in the folder named after its class (no listing needed;
    a few numpy operations over the memory-mapped paths)."""
    paths, labels = store.paths, np.asarray(store.labels)
    names = [n.encode("utf-8") for n in store.class_names]
    width = max(1, max(len(n) for n in names))
    table = np.zeros((len(names), width), np.uint8)
    for i, name in enumerate(names):
        table[i, :len(name)] = np.frombuffer(name, np.uint8)
    name_lengths = np.array([len(n) for n in names], np.int64)
    known = labels >= 0
    label = np.where(known, labels, 0)
    lengths = _folder_lengths(paths)
    columns = np.arange(width)
    index = np.minimum(paths.offsets[:-1, None] + columns, max(len(paths.data) - 1, 0))
    folder = np.where(columns < lengths[:, None], paths.data[index], 0)
    wrong = known & ((lengths != name_lengths[label]) | (folder != table[label]).any(axis=1))
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        path, label = paths[row], int(labels[row])
        raise StoreError(store.path, f"row {row} ({path}) has label {label} = {store.class_names[label]!r}, "
                                     f"but lies in folder {path.split('/', 1)[0]!r}")


def check_regular_files(store: LabelStore, image_root: str) -> None:
    """Refuse an entry named like an image under ``image_root`` that is not a regular file (or a link
    to one), naming it; nothing is opened. One ``scandir`` pass (file types come with the listing;
    links cost a ``stat``)."""
    pending = [""]
    while pending:
        folder = pending.pop()
        with os.scandir(os.path.join(image_root, folder)) as entries:
            for entry in entries:
                relpath = f"{folder}/{entry.name}" if folder else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(relpath)
                elif folder and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.is_file():
                    try:
                        kind = file_kind(os.stat(entry.path).st_mode)
                    except OSError as error:
                        kind = f"unreadable ({error.strerror})"
                    if kind == "a directory":
                        continue  # a folder named like an image: not listed as one
                    raise StoreError(store.path, f"{os.path.join(image_root, relpath)} is {kind}, not a regular "
                                                 "file: remove it from the image tree (opening a FIFO blocks)")


def _image_size(path: str):
    """``(height, width)`` from an image file's header (PIL reads no pixels), or ``None``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except Exception:  # an undecodable image is the loader's to report, by name
        return None


def check_image_sizes(store: LabelStore, image_root: str, rows: int = SIZE_SAMPLE_ROWS, seed=None) -> None:
    """Compare the stored ``image_sizes`` of ``rows`` random rows (those that record one) with the
    sizes in their files' headers; raise :class:`StoreError` naming the first row that differs."""
    sizes = np.asarray(store.image_sizes)
    known = np.flatnonzero((sizes > 0).all(axis=1))
    if not known.size:
        return  # the store records no sizes (0, 0: unknown)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(known, size=min(rows, known.size), replace=False))
    paths = store.paths
    for row in chosen.tolist():
        found = _image_size(os.path.join(image_root, paths[row]))
        stored = (int(sizes[row, 0]), int(sizes[row, 1]))
        if found is not None and found != stored:
            raise StoreError(store.path, f"row {row} ({paths[row]}): stored image size {stored[0]}x{stored[1]} "
                                         f"(height x width), but the file is {found[0]}x{found[1]}: the store was "
                                         "made for other images")


def _list_and_compare(store: LabelStore, image_root: str, allow_extra_images: bool) -> List[str]:
    """The full check; returns the folders holding images (for the fingerprint)."""
    check_labels_match_folders(store)
    local = not remote.is_remote(image_root)
    if local:  # objects in a bucket are plain objects: nothing to open without blocking
        check_regular_files(store, image_root)
    images = list_images(image_root, classes=None)
    on_disk = set(images.relpaths)
    stored = store.paths.tolist()
    seen: Dict[str, int] = {}
    for row, path in enumerate(stored):
        if path not in on_disk:
            raise StoreError(store.path, f"row {row} refers to {path}, which is not under {image_root} "
                                         "(is this store made for another image set?)")
        if path in seen:
            raise StoreError(store.path, f"rows {seen[path]} and {row} both refer to {path}: one image "
                                         "would be read twice and another not at all")
        seen[path] = row
    if not allow_extra_images and len(on_disk) != len(seen):
        extra = next(p for p in images.relpaths if p not in seen)
        raise StoreError(store.path, f"{len(on_disk) - len(seen)} images under {image_root} have no "
                                     f"map, first: {extra}")
    if local:  # reading 64 headers from a bucket would cost 64 requests at every start
        check_image_sizes(store, image_root)
    return sorted({os.path.dirname(p) for p in images.relpaths})


def check_store_matches_images(store: LabelStore, image_root, allow_extra_images: bool = False,
                               cache: bool = True) -> None:
    """Refuse a store that does not describe the images under ``image_root`` (naming the first
    offending path): every row needs its image, no two rows the same image, every image under the
    root needs a row (unless ``allow_extra_images``), and each row's class folder must be the class
    name of its label. Entries named like images that are no regular files (FIFOs, devices, sockets)
    are refused, and a sample of the stored image sizes is compared with the files'
    (:func:`check_image_sizes`).

    Args:
        cache: remember a passed check (see the module docstring) and skip the listing while the
            tree's folders are unchanged.
    """
    if remote.is_remote(image_root):
        _list_and_compare(store, image_root, allow_extra_images)
        return
    image_root = os.path.abspath(os.fspath(image_root))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root {image_root} is not a directory")
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, store.header.content_sha256, image_root,
                                     bool(allow_extra_images)]).encode()).hexdigest()[:32]
    entry = os.path.join(_cache_dir(), key + ".json")
    if not cache or not _cache_writable():
        _list_and_compare(store, image_root, allow_extra_images)
        return
    from filelock import FileLock

    with FileLock(entry + ".lock"):
        remembered = _read_entry(entry)
        if remembered is not None and folder_fingerprint(image_root, remembered["folders"]) == \
                remembered["fingerprint"]:
            return
        folders = sorted(e.name for e in os.scandir(image_root) if e.is_dir())
        before = folder_fingerprint(image_root, folders)  # taken first: a change while listing shows
        holding = _list_and_compare(store, image_root, allow_extra_images)
        folders = sorted(set(folders) | set(holding))
        fingerprint = folder_fingerprint(image_root, folders)
        if any(fingerprint[f] != before[f] for f in before):
            return  # the tree changed while it was listed: do not remember this result
        _write_entry(entry, {"store": store.path, "root": image_root, "folders": folders,
                             "fingerprint": fingerprint})


def _cache_writable() -> bool:
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
    except OSError:
        return False
    return os.access(_cache_dir(), os.W_OK)


def _read_entry(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_entry(path: str, entry: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, path)
    except OSError:
        pass  # remembering is an optimisation
