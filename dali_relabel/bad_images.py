"""Images that cannot be decoded: a cheap structural check, and asking DALI why, file by file.

The data path never checks images one by one in Python: DALI reads and decodes them in C++. When a
batch fails, the loader decodes that batch's files alone (:func:`decode_problem`) to name the bad one.
"""
from __future__ import annotations

import os
import stat
from typing import Optional

import numpy as np

from .errors import DaliRelabelError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OTHER_MAGICS = (b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_EOI_SEARCH_BYTES = 4096


class BadImageError(DaliRelabelError, ValueError):
    """An image file cannot be decoded; the message names the file."""


def file_kind(mode: int) -> str:
    """What a ``stat`` mode says a path is, in words (``"a FIFO"``, ``"a directory"``, ...)."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "of an unknown kind"


def read_regular_file(path: str) -> np.ndarray:
    """The bytes of ``path`` (uint8), opened without blocking: a FIFO, device or socket raises
    :class:`BadImageError` instead of waiting forever for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImageError(f"{path}: not a regular file but {file_kind(mode)}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return np.frombuffer(f.read(), dtype=np.uint8)
    finally:
        os.close(fd)


def check_encoded_image(data: np.ndarray, path: str) -> None:
    """Cheap structural check of an encoded image (raises :class:`BadImageError`).

    Catches empty files, files that are no image at all and truncated JPEG/PNG files (their end
    marker is missing), with a message that says which. CMYK and grayscale JPEGs and PNGs named
    ``.JPEG`` pass: DALI decodes them.
    """
    head = data[:8].tobytes()
    if data.size == 0:
        raise BadImageError(f"{path}: empty file")
    if head.startswith(JPEG_MAGIC):
        if data[-_EOI_SEARCH_BYTES:].tobytes().rfind(b"\xff\xd9") < 0:
            raise BadImageError(f"{path}: truncated JPEG (no end-of-image marker)")
    elif head.startswith(PNG_MAGIC):
        if data[-_EOI_SEARCH_BYTES:].tobytes().rfind(b"IEND") < 0:
            raise BadImageError(f"{path}: truncated PNG (no IEND chunk)")
    elif not head.startswith(OTHER_MAGICS):
        raise BadImageError(f"{path}: not a recognised image format (starts with {head[:4]!r})")


def decode_problem(path: str) -> Optional[str]:
    """Why DALI's CPU decoder cannot read or decode ``path`` (a file or an ``s3://`` URL, run alone), or
    ``None`` if it can."""
    from nvidia.dali import fn, pipeline_def

    from . import remote

    try:
        if remote.is_remote(path):
            data = np.frombuffer(remote.read_bytes(path), dtype=np.uint8)
        else:
            data = read_regular_file(path)
    except remote.RemoteError as error:
        return f"cannot be read ({str(error).split(': ', 1)[-1]})"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except BadImageError as error:
        return str(error).rsplit(": ", 1)[-1]
    try:
        check_encoded_image(data, path)
    except BadImageError as error:
        return str(error).rsplit(": ", 1)[-1]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode_one():
        jpeg = fn.external_source(source=lambda: [data], batch=True)
        return fn.peek_image_shape(jpeg), fn.decoders.image(jpeg, device="cpu")

    try:
        pipe = decode_one()
        pipe.build()
        pipe.run()
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = [line for line in lines if "failure" in line or "Error" in line or "error" in line]
        return "cannot be decoded (DALI: " + (detail[-1] if detail else lines[-1])[:200] + ")"
    return None
