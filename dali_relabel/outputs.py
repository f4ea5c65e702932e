"""Publishing output files safely: one writer per output, and renames that survive a crash.

Every job that writes a file others will read (a label store, a training checkpoint) writes it under
a temporary name and renames it into place when complete. This module holds the two rules around
that rename:

* :class:`OutputLock`: one writer per output. An exclusive ``flock`` on ``<out>.lock`` (or a lock file
  inside an output directory, as a training run's ``train.lock``), taken before any worker process
  starts and held until the output is published; a second writer is refused at
  once with :class:`OutputBusyError`, naming the holder (its pid, host, start time and command are
  written into the lock file). Worker processes forked while the lock is held share it, so a writer
  whose workers outlived it still counts as running.
* :func:`durable_replace`: ``fsync`` the finished file, rename it, ``fsync`` the directory, so that
  after a power loss the output is either the complete new file or the previous state, never an
  empty or partial file under the final name.

:func:`~dali_relabel.processes.processes_holding` says which processes hold a file open, for messages.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from .errors import DaliRelabelError
from .processes import describe_processes, processes_holding

LOCK_SUFFIX = ".lock"


class OutputBusyError(DaliRelabelError, RuntimeError):
    """Another process is writing the same output (or holds its partial file open)."""

    def __init__(self, path, message: str):
        super().__init__(message)
        self.path = os.fspath(path)


# -- durable renames --------------------------------------------------------------------------------
def fsync_file(path) -> None:
    """Flush ``path``'s data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to stable storage; a file system
    that cannot fsync a directory is left alone."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def durable_replace(src, dst) -> None:
    """Rename the complete file ``src`` to ``dst`` durably: fsync ``src``, rename, fsync the directory."""
    src, dst = os.fspath(src), os.fspath(dst)
    fsync_file(src)
    os.replace(src, dst)
    fsync_directory(os.path.dirname(os.path.abspath(dst)))


def is_lock_error(error: OSError) -> bool:
    """Whether an ``OSError`` (e.g. from ``h5py.File``) means another process holds the file's lock."""
    return (isinstance(error, BlockingIOError) or getattr(error, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK)
            or "unable to lock file" in str(error))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- one writer per output ----------------------------------------------------------------------------
class OutputLock:
    """An exclusive lock on writing ``out``: ``flock`` on ``<out>.lock`` (a context manager).

    Args:
        out: the output path (the lock file is ``out + ".lock"`` beside it).
        grace: when the recorded holder is a process of this host that no longer runs, wait up to
            this many seconds for its worker processes (which die with it) to let the lock go.
        lock_path: the lock file, where not beside ``out`` (a directory's own lock lives inside it).

    :meth:`acquire` raises :class:`OutputBusyError` at once if another process holds the lock, naming
    it. The lock file is removed on :meth:`release`; one left by a killed writer is simply reused.
    """

    def __init__(self, out, grace: float = 5.0, lock_path=None):
        self.out = os.fspath(out)
        self.path = os.fspath(lock_path) if lock_path is not None else self.out + LOCK_SUFFIX
        self.grace = grace
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            return self
        deadline = time.monotonic() + self.grace
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = self._read(fd)
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                if self._holder_gone(holder) and time.monotonic() < deadline:
                    time.sleep(0.1)  # its workers die with it (PR_SET_PDEATHSIG): give them a moment
                    continue
                raise OutputBusyError(self.out, self._busy_message(holder)) from None
            # A writer that finishes removes the lock file: the file locked must still be the one named.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and let the lock go (a no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter then sees another file and retries
        except FileNotFoundError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _holder_gone(holder: dict) -> bool:
        pid = holder.get("pid")
        return isinstance(pid, int) and holder.get("host") == socket.gethostname() and not _alive(pid)

    def _busy_message(self, holder: dict) -> str:
        pid, host = holder.get("pid"), holder.get("host", "?")
        who = (f"process {pid} on {host} (started {holder.get('started', '?')}: {holder.get('command', '?')})"
               if pid is not None else "another process")
        message = f"{self.out} is being written by {who}"
        holders = [(p, c) for p, c in processes_holding(self.path) if p != pid]
        if self._holder_gone(holder):
            message = (f"{self.out} was being written by process {pid}, which is gone, but "
                       f"{describe_processes(holders) or 'processes it started'} still hold its lock; "
                       "stop them, then run again")
        elif holders and host == socket.gethostname():
            message += f"; processes holding the lock: {describe_processes(holders)}"
        return (message + f". One output takes one writer at a time (two would corrupt it): wait for it to "
                f"finish, or stop it. The lock is {self.path}.")

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OutputLock({self.out!r}, held={self.held})"
