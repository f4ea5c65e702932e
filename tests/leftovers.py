"""What a test session must not leave behind: child processes, threads, temporary files.

``tests/conftest.py`` calls :func:`start_session` before the first test and :func:`finish_session`
after the last, which fails the session when :func:`find` reports anything. A loader dropped without
``close()`` is released by its finalizer, so :func:`find` collects garbage first and gives released
threads and processes a few seconds to end.

Other test sessions may run on the same machine at the same time, so this session's temporary files
go into directories of its own (``TMPDIR`` and ``tempfile.tempdir``, and ``DALI_RELABEL_SHARED_DIR`` for
the loaders' files otherwise in ``/dev/shm``; child processes inherit them): whatever is left in them
at the end was left by this session. pytest's own ``tmp_path`` directories stay where pytest keeps
them and are not looked at.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

#: Threads of the package (CallThread names them so): one alive at the end belongs to a loader that
#: was never released, daemon or not.
THREAD_PREFIX = "dali-relabel"
#: Children that Python's multiprocessing starts once per process and keeps until this process
#: exits (they serve every later pool); not started by a test for itself.
INFRASTRUCTURE = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
#: Where the package puts temporary files: the temp directory, and the loaders' shared directory.
REDIRECTED = ("TMPDIR", "DALI_RELABEL_SHARED_DIR")
#: Temporary entries that other software keeps past the session on purpose, by name prefix.
KEPT_ON_PURPOSE = {
    "__autograph_generated_file": "DALI's conditionals keep a pipeline function's generated source for "
                                  "tracebacks and remove it when the process exits",
    "pytest-of-": "pytest keeps the last tmp_path roots of the sessions that tests run in subprocesses",
    "torchinductor_": "torch's compile cache, meant to outlive the process",
}


def temp_roots() -> Tuple[str, ...]:
    """The directories temporary files go to now."""
    from dali_relabel.sources import _shared_directory

    return tuple(dict.fromkeys((tempfile.gettempdir(), _shared_directory())))


@dataclass
class Snapshot:
    """What existed when the snapshot was taken."""

    pid: int
    threads: FrozenSet[int]
    temp_entries: FrozenSet[str]
    roots: Tuple[str, ...]


def _entries(roots) -> FrozenSet[str]:
    found = set()
    for root in roots:
        try:
            found.update(os.path.join(root, name) for name in os.listdir(root))
        except OSError:
            continue
    return frozenset(found)


def snapshot() -> Snapshot:
    roots = temp_roots()
    return Snapshot(os.getpid(), frozenset(t.ident for t in threading.enumerate()), _entries(roots), roots)


def _children(pid: int) -> List[int]:
    from dali_relabel.processes import parent_pid, process_state

    return sorted(int(name) for name in os.listdir("/proc")
                  if name.isdigit() and parent_pid(int(name)) == pid and process_state(int(name)) not in ("", "X"))


def _current(start: Snapshot) -> List[str]:
    from dali_relabel.call_thread import ABANDONED
    from dali_relabel.processes import process_command, process_state

    found = []
    for pid in _children(start.pid):
        command = process_command(pid, limit=200)
        if any(name in command for name in INFRASTRUCTURE):
            continue
        state = " (a zombie nobody waited for)" if process_state(pid) == "Z" else ""
        found.append(f"child process {pid}{state}: {command}")
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.ident in start.threads:
            continue
        if thread.daemon and thread.name.endswith(ABANDONED):
            # The watchdog gave up on a DALI call waiting for a worker that died (the worker-fault
            # tests kill one on purpose): DALI offers no way to interrupt that wait, so the thread
            # stays in it; it is a daemon, holds no loader, and does not hold up the exit.
            continue
        if not thread.daemon or thread.name.startswith(THREAD_PREFIX):
            found.append(f"thread {thread.name!r} ({'daemon' if thread.daemon else 'not a daemon'}, "
                         f"target {getattr(thread, '_target', None)!r})")
    found += [f"temporary file {path}" for path in sorted(_entries(start.roots) - start.temp_entries)
              if not os.path.basename(path).startswith(tuple(KEPT_ON_PURPOSE))]
    return found


def find(start: Snapshot, wait: float = 10.0) -> List[str]:
    """What is left since ``start``: child processes, threads that are not daemons or are ours, and
    new entries in the temporary directories. Garbage is collected first (finalizers release dropped
    loaders); what is left is looked at again for up to ``wait`` seconds while it winds down."""
    gc.collect()
    deadline = time.monotonic() + wait
    found = _current(start)
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        gc.collect()
        found = _current(start)
    return found


_SESSION: Dict[str, object] = {}


def start_session() -> Snapshot:
    """Give this session temporary directories of its own (see the module's docstring) and take the
    snapshot :func:`finish_session` compares with."""
    private = [tempfile.mkdtemp(prefix="dali-relabel-tests-")]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    private.append(tempfile.mkdtemp(prefix="dali-relabel-tests-shm-", dir=shm))
    _SESSION.update(private=private, environ={name: os.environ.get(name) for name in REDIRECTED},
                    tempdir=tempfile.tempdir)
    os.environ["TMPDIR"], os.environ["DALI_RELABEL_SHARED_DIR"] = private
    tempfile.tempdir = private[0]
    return snapshot()


def finish_session(start: Snapshot) -> List[str]:
    """What the session left behind (:func:`find`); the private directories are removed and the
    environment restored either way."""
    try:
        return find(start)
    finally:
        for path in _SESSION.get("private", []):
            shutil.rmtree(path, ignore_errors=True)
        for name, value in (_SESSION.get("environ") or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = _SESSION.get("tempdir")  # type: Optional[str]
        _SESSION.clear()
