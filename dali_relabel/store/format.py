"""The store formats in code: the errors, hashes and path rules every store kind shares, and the
label-map store's constants and value rules (``docs/store_format.md``), used by the writers and the
readers (the region store's own rules: ``region_format``)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Sequence

import h5py
import numpy as np

from ..errors import DaliRelabelError
from ..paths import PathTable

FORMAT_NAME = "dali-relabel-label-store"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PARTIAL_SUFFIX = ".partial"
HASH_CHUNK_ROWS = 1024  # rows per recorded SHA-256 (version 2): ~4.6 MB of ImageNet maps
#: How much a reader checks at open: the header only; plus the paths' hash and one random block's
#: hash; plus every block's hash and every value.
VERIFY_LEVELS = ("header", "sample", "full")
SCAN_ROWS = 8192


class StoreError(DaliRelabelError, ValueError):
    """A label store is missing, malformed, incomplete or does not fit its use."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def class_id_dtype(num_classes: int) -> np.dtype:
    """The smallest integer dtype able to hold class ids ``0 .. num_classes - 1``."""
    if num_classes <= 256:
        return np.dtype(np.uint8)
    if num_classes <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


@dataclass(frozen=True)
class StoreHeader:
    """The root attributes of a store (see ``docs/store_format.md``)."""

    num_rows: int
    num_classes: int
    k: int
    grid_h: int
    grid_w: int
    layout: str
    teacher: str = ""
    teacher_input_size: int = 0
    source: str = ""
    content_sha256: str = ""
    format_version: int = FORMAT_VERSION
    values_checked: bool = False

    @property
    def map_shape(self):
        """Shape of one row's map, ``(k, grid_h, grid_w)``."""
        return (self.k, self.grid_h, self.grid_w)


def str_array(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype("utf-8"))


def decode_strings(dataset) -> List[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in dataset[()]]


def normalise_relpath(path: str) -> str:
    return str(path).replace(os.sep, "/")


# -- hashing --------------------------------------------------------------------------------------
def row_bytes(*arrays) -> np.ndarray:
    """The bytes of rows ``[n]`` as hashed: each row's values of every array in turn (a map store's
    logits, class ids, label and size; a region store's datasets in their declared order), row after
    row, as a uint8 ``[n, bytes per row]`` array."""
    n = len(arrays[0])
    return np.concatenate([np.ascontiguousarray(a).reshape(n, -1).view(np.uint8) for a in arrays], axis=1)


def paths_digest(paths: PathTable) -> bytes:
    """SHA-256 of the path table (offsets as little-endian int64, then the bytes)."""
    digest = hashlib.sha256(np.ascontiguousarray(paths.offsets, dtype="<i8"))
    digest.update(np.ascontiguousarray(paths.data))
    return digest.digest()


def root_hash(chunk_digests: np.ndarray, path_digest: bytes, class_names: Sequence[str],
              prefix: bytes = b"dali-relabel-label-store/2\0") -> str:
    """A store's ``content_sha256``: over ``prefix`` (the format and its version: a version-2 map
    store's by default), the row blocks' hashes, the paths and the names."""
    digest = hashlib.sha256(prefix)
    digest.update(np.ascontiguousarray(chunk_digests, dtype=np.uint8).tobytes())
    digest.update(path_digest)
    digest.update("\n".join(class_names).encode("utf-8"))
    return digest.hexdigest()


def content_hash_v1(logits, class_ids, labels, image_sizes, paths: Sequence[str]) -> str:
    """A version-1 store's ``content_sha256`` (arrays in row blocks, then the joined paths)."""
    digest = hashlib.sha256()
    n = len(paths)
    for start in range(0, n, SCAN_ROWS):
        stop = min(n, start + SCAN_ROWS)
        for array in (logits, class_ids, labels, image_sizes):
            digest.update(np.ascontiguousarray(array[start:stop]).tobytes())
    digest.update("\n".join(paths).encode("utf-8"))
    return digest.hexdigest()


def plan_hash(paths: Sequence[str], header_items: dict) -> str:
    """Hash of what a writer plans to write: the path list and the header, for safe resuming."""
    digest = hashlib.sha256()
    digest.update(repr(sorted(header_items.items())).encode("utf-8"))
    digest.update("\n".join(paths).encode("utf-8"))
    return digest.hexdigest()


# -- value rules ----------------------------------------------------------------------------------
def map_value_problem(logits: np.ndarray, class_ids: np.ndarray, num_classes: int):
    """``None`` if a batch of maps ``[n, k, H, W]`` keeps the format's rules (every class id in
    ``[0, num_classes)``, distinct within each cell, every logit finite), else ``(index of the first
    bad map, what is wrong)``."""
    n = len(logits)
    if n == 0:
        return None
    bad_ids = ((class_ids < 0) | (class_ids >= num_classes)).reshape(n, -1).any(axis=1)
    bad_logits = ~np.isfinite(logits).reshape(n, -1).all(axis=1)
    ordered = np.sort(class_ids.reshape(n, class_ids.shape[1], -1), axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).reshape(n, -1).any(axis=1)
    bad = bad_ids | bad_logits | repeated
    if not bad.any():
        return None
    first = int(np.flatnonzero(bad)[0])
    if bad_ids[first]:
        ids = class_ids[first].reshape(-1)
        value = ids[(ids < 0) | (ids >= num_classes)][0]
        return first, f"class id {int(value)} is outside [0, {num_classes})"
    if bad_logits[first]:
        position = int(np.flatnonzero(~np.isfinite(logits[first]).reshape(-1))[0])
        index = tuple(int(i) for i in np.unravel_index(position, logits.shape[1:]))
        return first, f"logit at index {index} is {logits[first][index]} (not finite)"
    ids = class_ids[first].reshape(class_ids.shape[1], -1)
    cell = int(np.flatnonzero((np.sort(ids, axis=0)[1:] == np.sort(ids, axis=0)[:-1]).any(axis=0))[0])
    y, x = np.unravel_index(cell, class_ids.shape[2:])
    return first, (f"cell ({int(y)}, {int(x)}) holds class ids {sorted(int(c) for c in ids[:, cell])}: "
                   "a class may appear once per cell")


def check_map_values(logits: np.ndarray, class_ids: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if maps break the format's rules (see
    :func:`map_value_problem`); ``logits``/``class_ids`` of one map ``[k, H, W]`` or a batch ``[n, k, H, W]``."""
    batch = logits.ndim == 4
    problem = map_value_problem(logits if batch else logits[None], class_ids if batch else class_ids[None],
                                num_classes)
    if problem is not None:
        index, what = problem
        raise ValueError(f"{where}{f' (map {index})' if batch else ''}: {what}")
