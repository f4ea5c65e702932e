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


# System call numbers (Linux) of the calls a thread waits in while it opens or reads a file.
_FILE_SYSCALLS = {
    "x86_64": {"open": {2: 0, 257: 1, 437: 1}, "read": {0, 17, 19, 295, 327}},
    "aarch64": {"open": {56: 1, 437: 1}, "read": {63, 65, 67, 69, 286}},
}


def _path_at(pid: int, address: int, limit: int = 4096) -> Optional[str]:
    """The zero-terminated string at ``address`` in ``pid``'s memory (``/proc/<pid>/mem``)."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, limit, address)
    except (OSError, OverflowError, ValueError):
        return None
    finally:
        os.close(fd)
    return data.split(b"\0", 1)[0].decode("utf-8", "replace") or None


def blocked_file_calls(pid: Optional[int] = None) -> List[Tuple[int, str, str]]:
    """``(thread id, "open" or "read", path)`` of each thread of ``pid`` (default: this process) that
    waits inside an ``open``/``read`` system call on a file, read from ``/proc/<pid>/task/*/syscall``
    (a hung network file system, a FIFO nobody writes to); ``[]`` where ``/proc`` does not tell."""
    import platform

    calls = _FILE_SYSCALLS.get(platform.machine())
    pid = os.getpid() if pid is None else pid
    if calls is None:
        return []
    try:
        threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
    found = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
            number, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
        except (OSError, ValueError, IndexError):
            continue  # running (no call to read), gone, or not allowed
        if number in calls["open"]:
            path = _path_at(pid, args[calls["open"][number]])
            if path is not None:
                found.append((tid, "open", path))
        elif number in calls["read"]:
            try:
                found.append((tid, "read", os.readlink(f"/proc/{pid}/fd/{args[0]}")))
            except OSError:
                continue
    return found
