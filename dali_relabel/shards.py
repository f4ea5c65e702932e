"""Self-contained tar shards: every image with its label map, streamed together (webdataset).

On a cluster the training set rarely sits as 1.28M small files on a local disk; it lives on a shared
or object-backed file system where sequential reads of large files are fast and small random reads
are not. :func:`write_shards` packs an image tree and its label store into tar shards of about
``shard_bytes`` each. Every sample is one tar member group sharing the key ``<row>``:

* ``<row>.jpg``: the encoded image, byte for byte as in the tree;
* ``<row>.logits`` and ``<row>.ids``: its label map ``[k, H, W]`` as raw little-endian arrays in the
  store's dtypes (float16, and uint8/uint16/int32 class ids);
* ``<row>.label``: the hard label (int32) and ``<row>.row``: the store row (int64), raw.

From a region store (FKD's soft labels, :class:`~dali_relabel.store.RegionStore`), a sample carries
all R stored crops of its image in place of the map, raw in the store's dtypes:
``<row>.boxes`` ``[R, 4]`` float32 (x0, y0, w, h in source pixels), ``<row>.flips`` ``[R]`` uint8,
``<row>.rids`` ``[R, k]`` class ids and ``<row>.values`` ``[R, k]`` probabilities (float16 or
float32). ``index.json`` says the kind (``"maps"``, ``"regions"`` or ``"images"``:
:data:`~dali_relabel.fields.SHARD_KIND_FIELDS`), and for regions R, k, the label type and the
values' dtype.

Without a store (validation sets) the shards hold images, labels and rows only (the rows are the
images' indices in the tree's sorted file list, and ``index.json`` keeps that list, for ReaL labels).

Rows are spread over the shards in a seeded random order, so every shard holds a balanced mix of
classes. Beside the shards: DALI's index files (``<shard>.idx``, made with DALI's ``wds2idx``) and
``index.json``, which records the store's content hash, the class names, the map geometry and
layout, each shard's name, sample count, size and content hashes (the whole shard's, and one per
block of :data:`~dali_relabel.shard_checks.HASH_BLOCK_BYTES`), its DALI index's hash, and the index's
own content hash.

:class:`ShardSet` reads ``index.json`` back (or a ``shard-{000000..000127}.tar`` brace pattern
beside it), from a directory or an ``s3://`` prefix, and checks it as untrusted input before DALI sees
anything (:mod:`dali_relabel.shard_checks`). DALI's webdataset reader streams the tars from object
storage itself, given their index files, which are fetched once into the local cache
(:mod:`dali_relabel.remote`). Without index files the reader would infer each one at every pipeline
build, one ranged request per tar member header: thousands of round trips per shard.

Writing is parallel (one process per shard at a time), shows progress, takes the output's lock, and
resumes: a shard is complete once its entry (``<shard>.entry.json``) exists, and a rerun keeps only
the shards whose bytes still hash as recorded: a truncated or damaged one is written again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import remote
from .fields import (CLASS_IDS, LABELS, LOGITS, ROWS, SHARD_FIELDS, SHARD_KIND_FIELDS, STORED_IDS, STORED_VALUES,
                     Field)
from .shard_checks import (HASH_BLOCK_BYTES, ShardError, check_blocks, damaged_member, file_sha256, index_digest,
                           member_sizes, parse_index_file, shard_digests, shard_kind, validate_index)
from .store import LabelStore, RegionStore, StoreError, store_kind

FORMAT_NAME = "dali-relabel-shards"
FORMAT_VERSION = 2  # 2: content hashes of the shards, their DALI indexes and the index itself
READABLE_VERSIONS = (2,)
INDEX_NAME = "index.json"
ENTRY_SUFFIX = ".entry.json"
#: How much :meth:`ShardSet.load` checks: the index, sizes and DALI indexes; plus one random block
#: of one random shard; plus every block of every shard.
VERIFY_LEVELS = ("header", "sample", "full")
#: The tar extensions of a map shard sample's members, in their order (:data:`~dali_relabel.fields.SHARD_FIELDS`).
EXTENSIONS = tuple(field.tar_ext for field in SHARD_FIELDS)
#: Shards store logits as float16 whatever the store holds.
LOGITS_DTYPE = "float16"
_TAR_BLOCK = 512


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class ShardSet:
    """What ``index.json`` says about a directory of shards.

    Attributes:
        directory: where the shards are (a directory or an ``s3://`` prefix).
        shards: per shard ``{"name", "samples", "bytes", "sha256", "blocks", "idx_sha256"}``.
        num_samples, num_classes, k, grid_h, grid_w, layout, ids_dtype, class_names: the data.
        store_sha256: content hash of the store the shards were made from.
        seed: the seed of the rows' order.
        kind: what a sample carries: ``"maps"``, ``"regions"`` or ``"images"``
            (:data:`~dali_relabel.fields.SHARD_KIND_FIELDS`).
        regions, label_type, values_dtype: of a region store's shards (R stored crops of ``k``
            labels each, how their dense targets are recovered, the values' dtype).
    """

    directory: str
    shards: List[dict]
    num_samples: int
    num_classes: int
    k: int
    grid_h: int
    grid_w: int
    layout: str
    ids_dtype: str
    class_names: List[str]
    store_sha256: str
    seed: int = 0
    relpaths: Optional[List[str]] = None
    extra: dict = field(default_factory=dict)
    kind: str = "maps"
    regions: int = 0
    label_type: str = ""
    values_dtype: str = ""
    #: remote shards: their index files' local copies, by shard name
    local_index: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    hash_block_bytes: int = HASH_BLOCK_BYTES
    #: whether DALI's reader maps local shards into memory (a little faster); with plain reads a shard
    #: truncated while it is read fails with an error instead of killing the process (SIGBUS)
    map_local_files: bool = field(default=True, compare=False)

    @property
    def has_maps(self) -> bool:
        """Whether the shards carry label maps (made from a label-map store)."""
        return self.kind == "maps"

    @property
    def has_regions(self) -> bool:
        """Whether the shards carry a region store's stored crops."""
        return self.kind == "regions"

    @classmethod
    def load(cls, location: str, check_sizes: bool = True, verify: str = "sample") -> "ShardSet":
        """From a directory, its ``index.json``, or a brace pattern ``DIR/shard-{000000..000127}.tar``
        (which then names the shards to use, all listed in the index beside them); ``DIR`` may be an
        ``s3://`` prefix.

        ``index.json`` is validated (every field, the shard names, its content hash); with
        ``check_sizes``, the shards are checked as ``verify`` says (:data:`VERIFY_LEVELS`:
        :meth:`check_files`)."""
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
        location = os.fspath(location)
        chosen = None
        if remote.is_remote(location):
            index_path, chosen = _remote_index_path(location)
            data = _read_remote_index(index_path)
            directory = remote.parent(index_path)
        else:
            if os.path.isdir(location):
                index_path = os.path.join(location, INDEX_NAME)
            elif location.endswith(".json"):
                index_path = location
            elif os.path.isfile(location) and _is_hdf5(location):  # a store given for shards
                raise ShardError(_not_shards(location))
            else:
                index_path = os.path.join(os.path.dirname(location) or ".", INDEX_NAME)
                chosen = set(os.path.basename(p) for p in expand_braces(location))
            try:
                with open(index_path, "rb") as f:
                    data = f.read()
            except OSError as error:
                raise ShardError(f"{index_path}: no shard index ({error.strerror}); write shards with "
                                 "`dali-relabel shard`") from None
            directory = os.path.dirname(os.path.abspath(index_path))
        try:
            index = json.loads(data)
        except ValueError:
            raise ShardError(f"{index_path}: not a readable shard index") from None
        validate_index(index, index_path, READABLE_VERSIONS, FORMAT_NAME)
        shards = index["shards"]
        if chosen is not None:
            unknown = chosen - {s["name"] for s in shards}
            if unknown:
                raise ShardError(f"{location}: {sorted(unknown)[0]} is not in {index_path}")
            shards = [s for s in shards if s["name"] in chosen]
        found = cls(directory=directory, shards=shards,
                    num_samples=sum(s["samples"] for s in shards), num_classes=index["num_classes"],
                    k=index["k"], grid_h=index["grid"][0], grid_w=index["grid"][1], layout=index["layout"],
                    ids_dtype=index["ids_dtype"], class_names=index["class_names"],
                    store_sha256=index["store_sha256"], seed=index["seed"],
                    relpaths=index.get("relpaths"), hash_block_bytes=index["hash_block_bytes"],
                    extra={k: v for k, v in index.items() if k not in ("shards", "class_names", "relpaths")},
                    kind=shard_kind(index), regions=index.get("regions", 0), label_type=index.get("label_type", ""),
                    values_dtype=index.get("values_dtype", ""))
        if check_sizes:
            found.check_files(verify)
        return found

    @property
    def on_object_storage(self) -> bool:
        """Whether the shards are on object storage (``s3://``)."""
        return self.directory.startswith(remote.SCHEME)

    def path(self, name: str) -> str:
        if self.on_object_storage:
            return remote.join(self.directory, name)
        return os.path.join(self.directory, name)

    def index_path(self, name: str) -> str:
        """Where DALI's index file of shard ``name`` is (an ``s3://`` URL for remote shards)."""
        return self.path(name[:-len(".tar")] + ".idx")

    def reader_index_path(self, name: str) -> str:
        """The local index file DALI's reader is given: remote ones fetched once into the cache."""
        if not self.on_object_storage:
            return self.index_path(name)
        if name not in self.local_index:
            self.local_index[name] = remote.cached_copy(self.index_path(name))
        return self.local_index[name]

    @property
    def extensions(self) -> List[str]:
        """The member extensions of every sample, in their order."""
        return [f.tar_ext for f in SHARD_KIND_FIELDS[self.kind]]

    def member_sizes(self) -> List[Optional[int]]:
        """The exact byte size of each member of :attr:`extensions` (``None``: the image, any size)."""
        itemsize = np.dtype(self.ids_dtype).itemsize if self.ids_dtype else 0
        if self.has_regions:
            return member_sizes(self.extensions, 0, itemsize, self.regions, self.k,
                                np.dtype(self.values_dtype).itemsize)
        return member_sizes(self.extensions, int(np.prod(self.map_shape)), itemsize)

    def check_sizes(self) -> None:
        """Refuse a missing or truncated shard (or index file), naming it."""
        listed = remote.list_objects(self.directory) if self.on_object_storage else None
        for shard in self.shards:
            self._check_size(shard, listed)

    def _check_size(self, shard: dict, listed: Optional[dict]) -> None:
        """Refuse ``shard`` (its entry) if it or its index file is missing or it is not of its
        recorded size; ``listed``: the sizes of the objects under a remote directory."""
        path = self.path(shard["name"])
        try:
            size = listed[shard["name"]] if listed is not None else os.path.getsize(path)
        except (KeyError, OSError):
            raise ShardError(f"{path}: missing (index.json lists it)") from None
        if size != shard["bytes"]:
            raise ShardError(f"{path}: {size} bytes, but {shard['bytes']} were written: the shard is "
                             f"truncated or was changed; write it again (`dali-relabel shard` with the same "
                             "arguments repairs it)")
        index = self.index_path(shard["name"])
        there = remote.basename(index) in listed if listed is not None else os.path.exists(index)
        if not there:
            raise ShardError(f"{index}: DALI index of {path} is missing")

    def damaged_shards(self, names: Optional[Sequence[str]] = None, deep: bool = False) -> Dict[str, str]:
        """``{name: problem}`` of the shards ``names`` (default: all) that :meth:`check_files` with
        ``"header"`` refuses (missing, not of their recorded size, a missing or unsound DALI index;
        remote ones through one listing), and with ``deep`` local ones whose blocks no longer hash as
        recorded (reads them whole: a failure's cost). Raises nothing for a damaged shard; the shard
        loaders' ``skip_bad_shards`` leaves these out."""
        listed = remote.list_objects(self.directory) if self.on_object_storage else None
        entries = {s["name"]: s for s in self.shards}
        found = {}
        for name in (names if names is not None else list(entries)):
            try:
                self._check_size(entries[name], listed)
                self.check_index_files([name])
                if deep and not self.on_object_storage:
                    check_blocks(self.path(name), entries[name], self.hash_block_bytes)
            except ShardError as problem:
                found[name] = str(problem)
        return found

    def check_index_files(self, names: Optional[Sequence[str]] = None) -> None:
        """Check each shard's DALI index (hash as recorded, every member inside the tar, the
        fixed-size members of their size) before DALI reads it; remembered per process while the
        files are unchanged, so a check before every pass costs a ``stat`` per file."""
        entries = {s["name"]: s for s in self.shards}
        sizes = self.member_sizes()
        for name in (names if names is not None else list(entries)):
            entry, idx_path = entries[name], self.reader_index_path(name)  # local (remote: cached copy)
            try:
                info = os.stat(idx_path)
            except OSError:
                raise ShardError(f"{idx_path}: DALI index of {self.path(name)} is missing") from None
            key = (idx_path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, entry["idx_sha256"],
                   entry["bytes"], tuple(self.extensions), tuple(sizes))
            if key in _CHECKED_INDEXES:
                continue
            if file_sha256(idx_path) != entry["idx_sha256"]:
                parse_index_file(idx_path, entry["bytes"], entry["samples"], self.extensions, sizes)
                raise ShardError(f"{idx_path}: differs from the DALI index written for {name} (content hash "
                                 "mismatch); write the shard again")
            parse_index_file(idx_path, entry["bytes"], entry["samples"], self.extensions, sizes)
            _CHECKED_INDEXES.add(key)

    def check_files(self, verify: str = "sample", names: Optional[Sequence[str]] = None) -> None:
        """The shards (default: all) against ``index.json``: present, of the recorded size, their
        DALI indexes sound (:meth:`check_index_files`); with ``verify="sample"`` one random block of
        one random shard hashes as recorded, with ``"full"`` every block of every shard (reads them)."""
        self.check_sizes()
        self.check_index_files(names)
        shards = [s for s in self.shards if names is None or s["name"] in names]
        if self.on_object_storage:
            return  # remote tars: sizes (one listing) and their indexes; their blocks are hashed locally only
        if verify == "full":
            for shard in shards:
                check_blocks(self.path(shard["name"]), shard, self.hash_block_bytes)
        elif verify == "sample" and shards:
            rng = np.random.default_rng()
            shard = shards[int(rng.integers(len(shards)))]
            if shard["blocks"]:
                check_blocks(self.path(shard["name"]), shard, self.hash_block_bytes,
                             [int(rng.integers(len(shard["blocks"])))])

    def explain_failure(self, names: Sequence[str], error: BaseException) -> ShardError:
        """A :class:`ShardError` naming the shard (and sample key) behind DALI's ``error`` while
        reading ``names``: their files are checked again, every block hashed, and a changed shard's
        samples searched; reads those shards whole (a failure's cost, not a batch's)."""
        detail = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in reversed(detail) if "rror" in line or "failure" in line),
                      detail[-1] if detail else "")
        try:
            self.check_files("header", names)
        except ShardError as found:
            return found
        changed = None
        if self.on_object_storage:  # the tars' bytes are not read back from object storage
            return ShardError(f"reading the shards {', '.join(self.path(n) for n in names)} failed: {detail}")
        for name in names:
            entry = next(s for s in self.shards if s["name"] == name)
            try:
                check_blocks(self.path(name), entry, self.hash_block_bytes)
            except ShardError as found:
                changed = found
            problem = damaged_member(self.path(name), self.extensions, self.member_sizes())
            if problem is not None:
                return ShardError(f"{self.path(name)}: {problem}" + (" (the shard's content hash differs from "
                                  "what was written: write it again)" if changed is not None else
                                  " (as it was written: the image was bad in the image tree)"))
            if changed is not None:
                return changed
        return ShardError(f"reading {len(names)} shard(s) in {self.directory} ({', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''}) failed, and they are as written: DALI said: "
                          f"{detail[:300]}")

    @property
    def map_shape(self):
        return (self.k, self.grid_h, self.grid_w)

    def dtype(self, field: Field) -> np.dtype:
        """The dtype ``field`` of a sample (of :data:`~dali_relabel.fields.SHARD_KIND_FIELDS`) is stored in."""
        return member_dtype(field, self.ids_dtype, self.values_dtype)


def _remote_index_path(location: str):
    """``(URL of index.json, chosen shard names or None)`` of an ``s3://`` shard location."""
    if location.endswith(".json"):
        return location, None
    if location.endswith(".tar") or "{" in location:
        chosen = set(remote.basename(p) for p in expand_braces(location))
        return remote.join(remote.parent(location), INDEX_NAME), chosen
    return remote.join(location, INDEX_NAME), None


def _read_remote_index(index_url: str) -> bytes:
    """``index.json`` of remote shards; a prefix with no shards at all says so."""
    try:
        return remote.read_bytes(index_url)
    except remote.NoSuchObjectError:
        directory = remote.parent(index_url)
        tars = [key for key in remote.list_objects(directory) if key.endswith(".tar")]
        if not tars:
            raise ShardError(f"{directory}: no shards under this URL (no index.json, no .tar objects); write "
                             "them with `dali-relabel shard --out s3://...`") from None
        raise ShardError(f"{index_url}: no shard index beside the {len(tars)} .tar objects; write shards "
                         "with `dali-relabel shard`") from None


_CHECKED_INDEXES: set = set()  # DALI indexes checked in this process (path, stat, recorded hash)


def member_dtype(field: Field, ids_dtype, values_dtype=None) -> np.dtype:
    """The little-endian dtype of a shard member (``ids_dtype``: the class ids' of the store;
    ``values_dtype``: a region store's values')."""
    dtype = {LOGITS: LOGITS_DTYPE, CLASS_IDS: ids_dtype, STORED_IDS: ids_dtype,
             STORED_VALUES: values_dtype}.get(field, field.dtype)
    return np.dtype(dtype).newbyteorder("<")


def expand_braces(pattern: str) -> List[str]:
    """``a-{000..002}.tar`` -> ``[a-000.tar, a-001.tar, a-002.tar]`` (webdataset's shard patterns;
    zero padding follows the first bound)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for i in range(int(first), int(last) + 1) for p in expand_braces(f"{head}{i:0{width}d}{tail}")]


# -- writing --------------------------------------------------------------------------------------
def _member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # the same inputs give the same bytes
    return info


def _tar_bytes(sizes: Sequence[int]) -> int:
    """Bytes a tar member group of these payload sizes takes (a header block each, padded data)."""
    return sum(_TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK for size in sizes)


def _write_shard(task) -> dict:
    """Write one shard (``.tar`` then DALI's ``.idx``); returns its index entry."""
    from .processes import die_with_parent

    directory, name, rows, image_root, store_path, parent, tree = task
    die_with_parent(parent)
    import io

    import wds2idx

    ids_dtype = values_dtype = None
    kind = "images"
    if store_path is not None:
        kind = "maps" if store_kind(store_path) == "label store" else "regions"
        store = (LabelStore if kind == "maps" else RegionStore)(store_path, verify="header")
        paths, labels = store.paths, store.labels
        found = store.read(np.sort(rows))  # one read per dataset, rows in increasing order
        order = {int(r): i for i, r in enumerate(np.sort(rows))}
        ids_dtype = found.class_ids.dtype
        if kind == "maps":
            stored = {"logits": found.logits, "class_ids": found.class_ids}
        else:
            values_dtype = found.values.dtype
            stored = {"stored_boxes": found.boxes, "stored_flips": found.flips, "stored_ids": found.class_ids,
                      "stored_values": found.values}
    else:
        paths, labels = tree
    path = os.path.join(directory, name)
    if os.path.exists(path + ENTRY_SUFFIX):
        os.remove(path + ENTRY_SUFFIX)  # the shard is written again: it is complete only with a new entry
    partial = path + ".partial"
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            row = int(row)
            with open(os.path.join(image_root, paths[row]), "rb") as f:
                values = {"jpegs": f.read(), "labels": labels[row], "rows": row}
            if store_path is not None:
                values.update({field: array[order[row]] for field, array in stored.items()})
            for field in SHARD_KIND_FIELDS[kind]:
                value = values[field.name]
                data = value if isinstance(value, bytes) else \
                    np.asarray(value).astype(member_dtype(field, ids_dtype, values_dtype)).tobytes()
                tar.addfile(_member(f"{row:09d}.{field.tar_ext}", data), io.BytesIO(data))
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    index_partial = os.path.join(directory, name[:-len(".tar")] + ".idx.partial")
    with wds2idx.IndexCreator(path, index_partial, verbose=False) as creator:
        creator.create_index()
    os.replace(index_partial, index_partial[:-len(".partial")])
    digest, blocks = shard_digests(path)
    entry = {"name": name, "samples": len(rows), "bytes": os.path.getsize(path), "sha256": digest,
             "blocks": blocks, "idx_sha256": file_sha256(index_partial[:-len(".partial")])}
    _write_json(path + ENTRY_SUFFIX, entry)  # last: the shard is complete
    return entry


def _write_json(path: str, value) -> None:
    """Write ``value`` as JSON to ``path`` durably (a complete file or none)."""
    from .outputs import durable_replace

    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    durable_replace(tmp, path)


def _kept_entry(out_dir: str, name: str, samples: int) -> Optional[dict]:
    """The recorded entry of a shard written earlier if the shard and its DALI index still hash as
    recorded (every byte is read), else ``None``: it is written again."""
    path = os.path.join(out_dir, name)
    try:
        with open(path + ENTRY_SUFFIX) as f:
            entry = json.load(f)
        if entry.get("samples") != samples or os.path.getsize(path) != entry.get("bytes") or \
                file_sha256(os.path.join(out_dir, name[:-len(".tar")] + ".idx")) != entry.get("idx_sha256"):
            return None
        if shard_digests(path) != (entry.get("sha256"), entry.get("blocks")):
            return None
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return entry


def plan_shards(sizes: np.ndarray, order: np.ndarray, shard_bytes: int) -> List[np.ndarray]:
    """Split the rows in ``order`` into consecutive groups of about ``shard_bytes`` (``sizes`` are
    each row's bytes in the tar); every group holds at least one row."""
    cumulative = np.cumsum(sizes[order])
    cuts = []
    start_bytes, start = 0, 0
    for end in range(1, len(order) + 1):
        if cumulative[end - 1] - start_bytes >= shard_bytes or end == len(order):
            cuts.append(order[start:end])
            start_bytes, start = cumulative[end - 1], end
    return cuts


def write_shards(image_root, store, out_dir, shard_bytes: int = 1 << 30, seed: int = 0,
                 workers: Optional[int] = None, progress: bool = True, check_files: bool = True) -> ShardSet:
    """Pack ``image_root`` and its label ``store`` into tar shards under ``out_dir``.

    Args:
        image_root: the ImageFolder tree the store describes.
        store: the label store (path or :class:`LabelStore`); ``None`` packs the tree's images and
            hard labels alone (validation sets).
        out_dir: where the shards, their index files and ``index.json`` go.
        shard_bytes: target size of a shard.
        seed: seed of the rows' order over the shards.
        workers: processes writing shards (default: the cores).
        progress: show a progress bar.
        check_files: refuse a store that does not match the tree (the loader's checks).

    A rerun with the same arguments keeps the shards already complete whose bytes still hash as
    recorded, and writes the rest (a truncated or damaged shard is written again); other arguments
    over an existing set are refused (delete the directory first). One writer per ``out_dir``: a
    second is refused at once (:class:`~dali_relabel.outputs.OutputLock` on ``<out_dir>.lock``).
    """
    from .outputs import OutputLock

    with OutputLock(os.path.abspath(os.fspath(out_dir))):
        return _write_shards(image_root, store, out_dir, shard_bytes, seed, workers, progress, check_files)


def _write_shards(image_root, store, out_dir, shard_bytes, seed, workers, progress, check_files) -> ShardSet:
    from tqdm import tqdm

    from .imagefolder import list_images
    from .tree_check import check_store_matches_images

    if remote.is_remote(os.fspath(image_root)) or remote.is_remote(os.fspath(out_dir)):
        raise ShardError(f"write_shards reads a local image tree into a local directory ({image_root} -> "
                         f"{out_dir}); `dali-relabel shard --out s3://...` uploads the result")
    image_root, out_dir = os.path.abspath(os.fspath(image_root)), os.fspath(out_dir)
    if store is not None:
        if not isinstance(store, (LabelStore, RegionStore)):
            from .store import open_store

            store = open_store(store)
        if check_files:
            check_store_matches_images(store, image_root)
        paths, labels, class_names = store.paths, np.asarray(store.labels), list(store.class_names)
        content = store.header.content_sha256
        if isinstance(store, RegionStore):
            values_itemsize = _values_dtype(store).itemsize
            label_sizes = [16 * store.regions, store.regions,
                           *(itemsize * store.regions * store.k
                             for itemsize in (store.class_ids_dtype.itemsize, values_itemsize))]
        else:
            map_values = int(np.prod(store.header.map_shape))
            label_sizes = [2 * map_values, store.class_ids_dtype.itemsize * map_values]
        tree = None
    else:
        images = list_images(image_root)
        paths, labels, class_names = images.relpaths, np.asarray(images.labels, np.int32), images.classes
        content, label_sizes = "", []
        tree = (paths, labels)
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    n = len(paths)

    def file_sizes(start: int) -> List[int]:
        return [os.path.getsize(os.path.join(image_root, paths[r])) for r in range(start, min(n, start + 4096))]

    with ThreadPoolExecutor(max_workers=16) as pool:  # a stat per image: I/O bound
        image_bytes = np.array([s for chunk in pool.map(file_sizes, range(0, n, 4096)) for s in chunk], np.int64)
    sizes = image_bytes + _tar_bytes([0, *label_sizes, member_dtype(LABELS, None).itemsize,
                                       member_dtype(ROWS, None).itemsize]) + 2 * _TAR_BLOCK
    order = np.random.default_rng([seed, 0x5A4D]).permutation(n)
    groups = plan_shards(sizes, order, shard_bytes)
    plan = hashlib.sha256(json.dumps([content, image_root, seed, shard_bytes, FORMAT_VERSION]).encode()).hexdigest()
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            if json.load(f).get("plan_sha256") != plan:
                raise ShardError(f"{out_dir} holds shards written with other inputs or settings; delete it "
                                 "or choose another --out")
    else:
        with open(plan_path, "w") as f:
            json.dump({"plan_sha256": plan, "shards": len(groups)}, f)
    names = [shard_name(i) for i in range(len(groups))]
    entries = {}
    todo = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashing the kept shards: I/O bound
        kept = list(pool.map(lambda task: _kept_entry(out_dir, task[0], len(task[1])), zip(names, groups)))
    for name, rows, entry in zip(names, groups, kept):
        if entry is not None:
            entries[name] = entry
        else:
            todo.append((out_dir, name, rows, image_root, store.path if store is not None else None, os.getpid(),
                         tree))
    bar = tqdm(total=n, initial=sum(e["samples"] for e in entries.values()), unit="img", desc="shard",
               disable=not progress)
    try:
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for done in as_completed([pool.submit(_write_shard, task) for task in todo]):
                entry = done.result()
                entries[entry["name"]] = entry
                bar.update(entry["samples"])
    finally:
        bar.close()
    kind = "images" if store is None else "regions" if isinstance(store, RegionStore) else "maps"
    index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "image_root": image_root, "seed": seed,
             "store": store.path if store is not None else None, "store_sha256": content, "kind": kind,
             "num_classes": len(class_names), "k": 0, "grid": [0, 0], "layout": "HW", "ids_dtype": "",
             "extensions": [f.tar_ext for f in SHARD_KIND_FIELDS[kind]],
             "num_samples": n, "shards": [entries[name] for name in names], "class_names": class_names,
             "hash_block_bytes": HASH_BLOCK_BYTES}
    if kind == "maps":
        header = store.header
        index.update(num_classes=header.num_classes, k=header.k, grid=[header.grid_h, header.grid_w],
                     layout=header.layout, ids_dtype=str(store.class_ids_dtype))
    elif kind == "regions":
        header = store.header
        index.update(num_classes=header.num_classes, k=header.k, regions=header.regions,
                     label_type=header.label_type, ids_dtype=str(store.class_ids_dtype),
                     values_dtype=str(np.dtype(_values_dtype(store)).name))
    else:
        index["relpaths"] = list(paths)  # the rows' files, for ReaL labels
    index["index_sha256"] = index_digest(index)
    _write_json(os.path.join(out_dir, INDEX_NAME), index)
    return ShardSet.load(out_dir, verify="header")


def _values_dtype(store: RegionStore) -> np.dtype:
    """The dtype a region store keeps its values in (float16 or float32)."""
    return store.read(np.zeros(1, np.int64)).values.dtype


def check_shards_match_store(shards: ShardSet, store) -> None:
    """Refuse shards made from another store (different content hash)."""
    if shards.store_sha256 != store.header.content_sha256:
        raise StoreError(store.path, f"the shards in {shards.directory} were made from another store "
                                     f"(content {shards.store_sha256[:12]}, this one "
                                     f"{store.header.content_sha256[:12]})")


def _is_hdf5(path: str) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def _not_shards(location: str) -> str:
    """Why an HDF5 file given where shards are expected is none (a store is named by its kind)."""
    try:
        kind = store_kind(location)
    except StoreError:
        return f"{location}: an HDF5 file, not tar shards (write shards with `dali-relabel shard`)"
    return (f"{location} is a {kind}, not tar shards: pack it with `dali-relabel shard`, or train from the image "
            "tree with it (ReLabelLoader(images, store), or pipelines/train.py --data IMAGES --store STORE)")
