"""Relative image paths as one contiguous byte buffer, gathered a batch at a time.

A :class:`PathTable` holds N UTF-8 paths as ``data`` (uint8, all paths back to back) and ``offsets``
(int64 ``[N + 1]``): two flat arrays that can be memory-mapped and shared by every process, instead of a
list of N Python strings in each. :meth:`PathTable.gather` turns a batch of rows into the zero-padded
``[B, L]`` byte matrix and lengths that the data source hands to DALI's file reader, in a few numpy
operations whatever the batch size.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Tuple

import numpy as np

from .errors import DaliRelabelError


class UnsafePathError(DaliRelabelError, ValueError):
    """A stored image path would leave the image root (absolute, or with a ``..`` component)."""


class PathTable:
    """N paths as ``data`` (uint8 ``[total bytes]``) and ``offsets`` (int64 ``[N + 1]``).

    Path ``i`` is ``data[offsets[i]:offsets[i + 1]]`` decoded as UTF-8.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(data):
            raise ValueError("offsets must start at 0 and end at len(data)")
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_strings(cls, paths: Iterable[str]) -> "PathTable":
        encoded = [str(p).encode("utf-8") for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        row = int(row)
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} is outside the {len(self)} paths")
        row %= len(self)
        return self.data[self.offsets[row]:self.offsets[row + 1]].tobytes().decode("utf-8")

    def tolist(self) -> List[str]:
        """Every path as a string (decodes all of them: for small tables and tools)."""
        return [self[i] for i in range(len(self))]

    def gather(self, rows, prefix: bytes = b"") -> Tuple[np.ndarray, np.ndarray]:
        """``prefix + path`` of each row as a zero-padded uint8 ``[B, L]`` matrix and int32 lengths ``[B]``."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        width = int(lengths.max()) if len(rows) else 0
        columns = np.arange(width, dtype=np.int64)
        index = np.minimum(starts[:, None] + columns, max(len(self.data) - 1, 0))
        body = self.data[index] if len(self.data) else np.zeros((len(rows), width), np.uint8)
        body[columns >= lengths[:, None]] = 0
        head = np.frombuffer(prefix, dtype=np.uint8)
        matrix = np.concatenate([np.broadcast_to(head, (len(rows), len(head))), body], axis=1)
        return matrix, (lengths + len(head)).astype(np.int32)

    def check_confined(self, where: str) -> None:
        """Raise :class:`UnsafePathError` naming the first path that is absolute, holds a ``..``
        component or a NUL byte (each would read a file outside the image root)."""
        if len(self) == 0:
            return
        starts = self.offsets[:-1]
        nonempty = starts < self.offsets[1:]
        absolute = np.flatnonzero(nonempty & (self.data[np.minimum(starts, max(len(self.data) - 1, 0))] == ord("/")))
        if len(absolute):
            raise UnsafePathError(f"{where}: row {absolute[0]} has the absolute path {self[absolute[0]]!r}; "
                                  "stored paths must be relative to the image root")
        if (self.data == 0).any():
            row = int(np.searchsorted(self.offsets, np.flatnonzero(self.data == 0)[0], side="right") - 1)
            raise UnsafePathError(f"{where}: row {row} has a path with a NUL byte")
        blob = memoryview(np.ascontiguousarray(self.data))
        for match in re.finditer(rb"\.\.", blob):
            row = int(np.searchsorted(self.offsets, match.start(), side="right") - 1)
            begin, end = self.offsets[row], self.offsets[row + 1]
            before_ok = match.start() == begin or blob[match.start() - 1] == ord("/")
            after_ok = match.end() == end or blob[match.end()] == ord("/")
            if before_ok and after_ok:
                raise UnsafePathError(f"{where}: row {row} has the path {self[row]!r}, whose '..' leaves "
                                      "the image root")
