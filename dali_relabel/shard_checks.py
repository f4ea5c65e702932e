"""Shards as untrusted input: ``index.json``, DALI's index files and the shards' bytes, checked.

A shard set is read by DALI's webdataset reader, which trusts what it is given: a damaged ``.idx``
(a member declaring 8 GiB) crashes the process, an edited ``index.json`` (another grid or layout)
changes the targets silently, a shard named ``../../x`` is read from outside the set. So, before DALI
sees anything:

* :func:`validate_index`: every field of ``index.json`` present and of its type, shard names plain
  file names inside the shard directory (no ``..``, no absolute path, no link pointing out), and the
  index's own content hash (``index_sha256``) matching, so an edited layout or grid is refused;
* :func:`check_index_file`: each shard's DALI index well formed, every member inside the tar, the
  fixed-size members (maps or stored crops, label, row) of exactly their size; its hash as recorded;
* :func:`shard_digests` / :func:`root_digest`: each shard's content hash, over blocks of
  :data:`HASH_BLOCK_BYTES` so that a sample of the blocks can be checked at open;
* :func:`find_damage`: when DALI fails on a batch, which shard and which sample key is at fault.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DaliRelabelError
from .fields import JPEGS, SHARD_KIND_FIELDS

#: Bytes of a shard per recorded SHA-256 (the default open checks one random block).
HASH_BLOCK_BYTES = 32 << 20
_TAR_BLOCK = 512
_HEX64 = re.compile(r"[0-9a-f]{64}")
_IDS_DTYPES = ("uint8", "uint16", "int32")
_VALUES_DTYPES = ("float16", "float32")


class ShardError(DaliRelabelError, ValueError):
    """Shards are missing, truncated, damaged, or do not fit their index; the message names the shard."""


# -- index.json -----------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_FIELDS = {
    "format": (str, "a string"),
    "format_version": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "store_sha256": (str, "a string"),
    "num_classes": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "k": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "grid": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v),
             "two non-negative integers"),
    "layout": (lambda v: v in ("HW", "WH"), "'HW' or 'WH'"),
    "ids_dtype": (lambda v: v in ("",) + _IDS_DTYPES, f"one of {_IDS_DTYPES} (or '' without maps)"),
    "extensions": (_is_str_list, "a list of strings"),
    "num_samples": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "shards": (lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, dict) for s in v),
               "a non-empty list of shard entries"),
    "class_names": (_is_str_list, "a list of strings"),
    "hash_block_bytes": (lambda v: _is_int(v) and v >= _TAR_BLOCK, "an integer of at least 512"),
    "index_sha256": (lambda v: isinstance(v, str) and bool(_HEX64.fullmatch(v)), "a SHA-256 in hex"),
}
#: What ``index.json`` of a region store's shards adds.
_REGION_FIELDS = {
    "regions": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "label_type": (str, "a string"),
    "values_dtype": (lambda v: v in _VALUES_DTYPES, f"one of {_VALUES_DTYPES}"),
}
_SHARD_FIELDS = {
    "name": (str, "a string"),
    "samples": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "bytes": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "sha256": (lambda v: isinstance(v, str) and bool(_HEX64.fullmatch(v)), "a SHA-256 in hex"),
    "blocks": (lambda v: _is_str_list(v) and all(_HEX64.fullmatch(b) for b in v), "a list of SHA-256s in hex"),
    "idx_sha256": (lambda v: isinstance(v, str) and bool(_HEX64.fullmatch(v)), "a SHA-256 in hex"),
}


def _check_fields(entry: dict, fields: dict, where: str) -> None:
    for name, (valid, what) in fields.items():
        if name not in entry:
            raise ShardError(f"{where}: field '{name}' is missing")
        value = entry[name]
        ok = isinstance(value, valid) if isinstance(valid, type) else valid(value)
        if not ok:
            raise ShardError(f"{where}: field '{name}' must be {what}, found {value!r:.80}")


def index_digest(index: dict) -> str:
    """The content hash of an ``index.json`` (every field but ``index_sha256``, canonical JSON)."""
    import json

    body = {k: v for k, v in index.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def check_shard_name(directory: str, name: str, where: str) -> str:
    """The path of shard ``name`` in ``directory``; refuses a name that is no plain ``.tar`` file
    name, or a shard (or its DALI index) that is a link leading out of the directory."""
    if not name.endswith(".tar") or name in (".tar",) or "/" in name or "\\" in name or "\0" in name \
            or name.startswith(".") or os.path.isabs(name):
        raise ShardError(f"{where}: shard name {name!r} is not a plain file name inside the shard directory")
    root = os.path.realpath(directory)
    for member in (name, name[:-len(".tar")] + ".idx"):
        real = os.path.realpath(os.path.join(directory, member))
        if os.path.dirname(real) != root and os.path.lexists(os.path.join(directory, member)):
            raise ShardError(f"{where}: {os.path.join(directory, member)} leads out of the shard directory "
                             f"(to {real})")
    return os.path.join(directory, name)


def shard_kind(index: dict) -> str:
    """What a shard set's samples carry (:data:`~dali_relabel.fields.SHARD_KIND_FIELDS`): its index's
    ``kind``; indexes written before region shards have none and say it by their store hash."""
    return index.get("kind", "maps" if index.get("store_sha256") else "images")


def validate_index(index, index_path: str, readable_versions: Sequence[int], format_name: str) -> None:
    """Refuse an ``index.json`` with a missing or mistyped field, an unsafe shard name, counts that
    do not add up, or content that differs from what its writer hashed (an edited grid or layout)."""
    if not isinstance(index, dict) or index.get("format") != format_name:
        raise ShardError(f"{index_path}: not a dali-relabel shard index")
    if index.get("format_version") not in readable_versions:
        raise ShardError(f"{index_path}: shard index version {index.get('format_version')!r} is not readable "
                         f"(this reader reads {', '.join(map(str, readable_versions))}): write the shards "
                         "again into an empty directory")
    _check_fields(index, _FIELDS, index_path)
    if "relpaths" in index and not _is_str_list(index["relpaths"]):
        raise ShardError(f"{index_path}: field 'relpaths' must be a list of strings")
    if index_digest(index) != index["index_sha256"]:
        raise ShardError(f"{index_path}: its content differs from what was written (content hash mismatch): "
                         "the index was edited or damaged; write the shards again")
    if len(index["class_names"]) != index["num_classes"]:
        raise ShardError(f"{index_path}: {len(index['class_names'])} class names for num_classes="
                         f"{index['num_classes']}")
    kind = shard_kind(index)
    if not isinstance(kind, str) or kind not in SHARD_KIND_FIELDS:
        raise ShardError(f"{index_path}: field 'kind' must be one of {sorted(SHARD_KIND_FIELDS)}, found {kind!r:.80}")
    if bool(index["store_sha256"]) != (kind != "images"):
        raise ShardError(f"{index_path}: shards of kind {kind!r} " + ("need" if kind != "images" else "have no")
                         + " store content hash")
    if kind == "maps" and (index["k"] < 1 or min(index["grid"]) < 1 or not index["ids_dtype"]):
        raise ShardError(f"{index_path}: shards with maps need k, grid and ids_dtype")
    if kind == "regions":
        from .store.region_format import LABEL_TYPES

        _check_fields(index, _REGION_FIELDS, index_path)
        if index["k"] < 1 or index["k"] > index["num_classes"] or not index["ids_dtype"] or \
                index["label_type"] not in LABEL_TYPES:
            raise ShardError(f"{index_path}: shards of a region store need 1 <= k <= num_classes, ids_dtype and a "
                             f"label_type of {', '.join(LABEL_TYPES)}")
    expected = [f.tar_ext for f in SHARD_KIND_FIELDS[kind]]
    if index["extensions"] != expected:
        raise ShardError(f"{index_path}: extensions {index['extensions']} differ from {expected}")
    directory = os.path.dirname(os.path.abspath(index_path))
    names = set()
    for i, shard in enumerate(index["shards"]):
        where = f"{index_path}: shard entry {i}"
        _check_fields(shard, _SHARD_FIELDS, where)
        check_shard_name(directory, shard["name"], where)
        if shard["name"] in names:
            raise ShardError(f"{where}: {shard['name']} is listed twice")
        names.add(shard["name"])
        if len(shard["blocks"]) != -(-shard["bytes"] // index["hash_block_bytes"]):
            raise ShardError(f"{where}: {len(shard['blocks'])} block hashes for {shard['bytes']} bytes")
    if sum(s["samples"] for s in index["shards"]) != index["num_samples"]:
        raise ShardError(f"{index_path}: the shards' samples do not add up to num_samples={index['num_samples']}")


# -- content hashes -------------------------------------------------------------------------------
def block_digests(path: str, block_bytes: int = HASH_BLOCK_BYTES, blocks: Optional[Sequence[int]] = None,
                  size: Optional[int] = None) -> Dict[int, str]:
    """``{block: SHA-256 hex}`` of the file's ``blocks`` (default: all) of ``block_bytes``."""
    size = os.path.getsize(path) if size is None else size
    chosen = range(-(-size // block_bytes)) if blocks is None else blocks
    found = {}
    with open(path, "rb", buffering=0) as f:
        for block in chosen:
            f.seek(block * block_bytes)
            digest, left = hashlib.sha256(), min(block_bytes, size - block * block_bytes)
            while left > 0:
                data = f.read(min(left, 4 << 20))
                if not data:
                    break
                digest.update(data)
                left -= len(data)
            found[block] = digest.hexdigest()
    return found


def root_digest(blocks: Sequence[str]) -> str:
    """A shard's ``sha256``: over its blocks' hashes."""
    digest = hashlib.sha256(b"dali-relabel-shard/2\0")
    for block in blocks:
        digest.update(bytes.fromhex(block))
    return digest.hexdigest()


def shard_digests(path: str, block_bytes: int = HASH_BLOCK_BYTES) -> Tuple[str, List[str]]:
    """``(sha256, block hashes)`` of a shard file."""
    found = block_digests(path, block_bytes)
    blocks = [found[b] for b in sorted(found)]
    return root_digest(blocks), blocks


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_blocks(path: str, entry: dict, block_bytes: int, blocks: Optional[Sequence[int]] = None) -> None:
    """Refuse a shard whose ``blocks`` (default: all) hash otherwise than recorded, naming the bytes."""
    for block, digest in sorted(block_digests(path, block_bytes, blocks, entry["bytes"]).items()):
        if digest != entry["blocks"][block]:
            start = block * block_bytes
            stop = min(entry["bytes"], start + block_bytes)
            raise ShardError(f"{path}: bytes {start}..{stop - 1} differ from what was written (content hash "
                             "mismatch): the shard was changed or damaged; write it again (`dali-relabel "
                             "shard` with the same arguments repairs it)")


# -- DALI's index files ---------------------------------------------------------------------------
def member_sizes(extensions: Sequence[str], map_values: int, ids_itemsize: int, regions: int = 0,
                 region_k: int = 0, values_itemsize: int = 0) -> List[Optional[int]]:
    """The exact byte size of each member extension (``None``: any size, the image): ``map_values``
    values of a label map, or ``regions`` stored crops of ``region_k`` labels each (class ids of
    ``ids_itemsize`` bytes, values of ``values_itemsize``)."""
    sizes = {"logits": 2 * map_values, "ids": ids_itemsize * map_values, "label": 4, "row": 8,
             "boxes": 16 * regions, "flips": regions, "rids": ids_itemsize * regions * region_k,
             "values": values_itemsize * regions * region_k}
    return [None if ext == JPEGS.tar_ext else sizes[ext] for ext in extensions]


def parse_index_file(idx_path: str, tar_bytes: int, samples: int, extensions: Sequence[str],
                     sizes: Sequence[Optional[int]]) -> np.ndarray:
    """Check a DALI index file (``v1.2 <samples>``, then per sample ``ext offset size name`` for each
    member) against its tar; returns the members' ``[samples, members, 2]`` (offset, size). Raises
    :class:`ShardError` naming the index, the line and the sample key."""
    try:
        with open(idx_path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as error:
        raise ShardError(f"{idx_path}: DALI index cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ShardError(f"{idx_path}: DALI index is not text") from None
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or head[1] != str(samples):
        first = lines[0][:60] if lines else ""
        raise ShardError(f"{idx_path}: line 1 is {first!r}, expected 'v1.2 {samples}'")
    body = lines[1:]
    if len(body) != samples:
        raise ShardError(f"{idx_path}: {len(body)} sample lines, but the shard holds {samples} samples")
    members = len(extensions)
    counts = np.array([len(line.split()) for line in body])
    bad = np.flatnonzero(counts != 4 * members)
    if bad.size:
        raise ShardError(f"{idx_path}: line {bad[0] + 2} has {counts[bad[0]]} fields, expected {4 * members} "
                         f"({members} members of 4 fields)")
    tokens = np.array(" ".join(body).split(), dtype=object).reshape(samples, members, 4)
    keys = [t.split(".", 1)[0] for t in tokens[:, 0, 3]]
    wrong_ext = np.flatnonzero((tokens[:, :, 0] != np.array(extensions, dtype=object)).any(axis=1))
    if wrong_ext.size:
        line = int(wrong_ext[0])
        raise ShardError(f"{idx_path}: line {line + 2} (sample {keys[line]}): members {list(tokens[line, :, 0])}, "
                         f"expected {list(extensions)}")
    numbers = np.zeros((samples, members, 2), np.int64)
    for column in (1, 2):
        flat = tokens[:, :, column].reshape(-1)
        ok = np.array([t.isdigit() and len(t) <= 18 for t in flat]).reshape(samples, members)
        if not ok.all():
            line = int(np.flatnonzero(~ok.all(axis=1))[0])
            raise ShardError(f"{idx_path}: line {line + 2} (sample {keys[line]}): member "
                             f"{'offset' if column == 1 else 'size'} is not a number")
        numbers[:, :, column - 1] = flat.astype(np.int64).reshape(samples, members)
    offsets, lengths = numbers[:, :, 0], numbers[:, :, 1]
    fixed = np.array([-1 if s is None else s for s in sizes], np.int64)
    problems = [
        (offsets % _TAR_BLOCK != 0, "starts off a 512-byte tar block"),
        (offsets < _TAR_BLOCK, "starts inside the tar's first header"),
        (offsets + lengths > tar_bytes, f"ends beyond the shard's {tar_bytes} bytes"),
        ((fixed >= 0) & (lengths != fixed), "has the wrong size for its kind"),
        ((fixed < 0) & (lengths == 0), "is empty"),
    ]
    for bad_members, what in problems:
        if bad_members.any():
            line, member = (int(i) for i in np.argwhere(bad_members)[0])
            expected = f" (expected {fixed[member]} bytes)" if fixed[member] >= 0 and "size" in what else ""
            raise ShardError(f"{idx_path}: line {line + 2} (sample {keys[line]}): member {tokens[line, member, 3]} "
                             f"at offset {offsets[line, member]}, {lengths[line, member]} bytes, {what}{expected}; "
                             "the index is damaged: write the shard again")
    return numbers


# -- finding damage after DALI failed ---------------------------------------------------------------
def damaged_member(path: str, extensions: Sequence[str], sizes: Sequence[Optional[int]]) -> Optional[str]:
    """``"sample <key>: <problem>"`` for the first damaged sample of a shard (a member of the wrong
    size, missing, or an image that is no decodable image by its structure), or ``None``. Reads the
    whole shard: for error messages only."""
    from .bad_images import BadImageError, check_encoded_image

    expected = dict(zip(extensions, sizes))
    seen: Dict[str, set] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                seen.setdefault(key, set()).add(ext)
                if ext not in expected:
                    return f"sample {key}: unexpected member {member.name}"
                if expected[ext] is not None and member.size != expected[ext]:
                    return f"sample {key}: member {member.name} has {member.size} bytes, expected {expected[ext]}"
                if ext == JPEGS.tar_ext:
                    data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    try:
                        check_encoded_image(data, member.name)
                    except BadImageError as error:
                        return f"sample {key}: {error}"
    except (tarfile.TarError, OSError) as error:
        return f"not a readable tar ({error})"
    for key, exts in seen.items():
        if exts != set(extensions):
            return f"sample {key}: members {sorted(exts)}, expected {sorted(extensions)}"
    return None


def shards_of_rank(entries: Sequence[dict], order: Sequence[str], rank: int, world_size: int) -> List[str]:
    """The shards (of ``order``) that rank ``rank`` of ``world_size`` reads: DALI splits the
    concatenated samples into contiguous parts."""
    samples = {e["name"]: e["samples"] for e in entries}
    total = sum(samples[n] for n in order)
    first, last = rank * total // world_size, (rank + 1) * total // world_size
    chosen, start = [], 0
    for name in order:
        stop = start + samples[name]
        if stop > first and start < max(last, first + 1):
            chosen.append(name)
        start = stop
    return chosen
