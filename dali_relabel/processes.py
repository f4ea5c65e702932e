"""Other processes as Linux's ``/proc`` shows them, and workers that die with their parent.

Small helpers the loaders, the writers and their error messages share: a process's state letter,
parent and command line (:func:`process_state`, :func:`parent_pid`, :func:`process_command`), which
processes hold a file open (:func:`processes_holding`, :func:`describe_processes`), and
:func:`die_with_parent`, which a worker process calls so that a killed trainer or converter leaves no
orphans behind. Without ``/proc`` (not Linux) they answer "unknown" (``""``, ``None``, ``[]``) instead
of failing.
"""
from __future__ import annotations

import os
import signal
from typing import List, Optional, Tuple

#: What :func:`process_state`'s letters mean, for messages.
STATE_NAMES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped",
               "t": "stopped by a debugger", "Z": "dead", "X": "dead"}


def stat_fields(pid: int) -> List[str]:
    """The fields of ``/proc/<pid>/stat`` after ``pid (comm)``: state, ppid, ... (``proc(5)``'s
    fields 3 on); ``[]`` if the process is gone or there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``R``, ``S``, ``D``, ``T``, ``Z``...), ``""`` if gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else ""


def parent_pid(pid: int) -> Optional[int]:
    """The parent of ``pid``, ``None`` if it is gone."""
    fields = stat_fields(pid)
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def process_command(pid: int, limit: int = 120) -> str:
    """``pid``'s command line, shortened to ``limit`` characters (``"?"`` if unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = " ".join(f.read().replace(b"\0", b" ").decode("utf-8", "replace").split())
    except OSError:
        return "?"
    return command if len(command) <= limit else command[:limit - 3] + "..."


def processes_holding(path) -> List[Tuple[int, str]]:
    """``(pid, command)`` of the other processes that have ``path`` open, as far as this user can see
    them in ``/proc`` (an empty list elsewhere). Scans every process: meant for error messages."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    me = os.getpid()
    found = []
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        pid = int(name)
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
                found.append((pid, process_command(pid)))
                break
    return found


def describe_processes(processes: List[Tuple[int, str]], limit: int = 4) -> str:
    """``"pid 12 (cmd), pid 13 (cmd, orphaned)"`` for messages."""
    parts = []
    for pid, command in processes[:limit]:
        orphaned = ", orphaned: its parent is gone" if parent_pid(pid) == 1 else ""
        parts.append(f"pid {pid} ({command}{orphaned})")
    if len(processes) > limit:
        parts.append(f"{len(processes) - limit} more")
    return ", ".join(parts)


def die_with_parent(parent: int) -> None:
    """In a worker process: have the kernel kill it when ``parent`` (its parent) exits (Linux
    ``PR_SET_PDEATHSIG``), so a killed trainer leaves no orphans holding its files; exit now if the
    parent is already gone."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: nothing to arm
    if os.getppid() != parent:
        os._exit(1)
