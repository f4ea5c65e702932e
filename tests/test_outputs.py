"""Publishing outputs: one writer per output (the lock file), durable renames, who holds a file."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dali_relabel.outputs import OutputBusyError, OutputLock, durable_replace, processes_holding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def test_the_lock_is_exclusive_records_its_holder_and_is_removed(tmp_path):
    out = tmp_path / "store.h5"
    with OutputLock(out) as lock:
        assert lock.held and os.path.exists(lock.path)
        with open(lock.path) as f:
            holder = json.load(f)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputBusyError, match=f"{out} is being written by process {os.getpid()} on "
                                                  f"{socket.gethostname()}"):
            OutputLock(out).acquire()
    assert not os.path.exists(str(out) + ".lock")
    OutputLock(out).acquire().release()


def test_a_lock_file_left_by_a_killed_writer_is_reused(tmp_path):
    out = tmp_path / "store.h5"
    with open(str(out) + ".lock", "w") as f:
        json.dump({"pid": 999999, "host": socket.gethostname()}, f)  # nobody holds the flock
    with OutputLock(out):
        with open(str(out) + ".lock") as f:
            assert json.load(f)["pid"] == os.getpid()


_ORPHAN_HOLDS_THE_LOCK = """
import os, sys, time
from dali_relabel.outputs import OutputLock

OutputLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # a worker that does not die with its parent keeps the inherited lock
    os.close(1)
    os.close(2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_a_lock_kept_by_the_orphaned_workers_of_a_dead_writer_names_them(tmp_path):
    out = tmp_path / "store.h5"
    process = subprocess.run([sys.executable, "-c", _ORPHAN_HOLDS_THE_LOCK, str(out)], env=ENV,
                             capture_output=True, text=True, timeout=60)
    orphan = int(process.stdout.strip())
    try:
        started = time.monotonic()
        with pytest.raises(OutputBusyError, match=f"was being written by process {process_pid(out)}, which "
                                                  f"is gone, but pid {orphan} .*orphaned.* still hold its lock"):
            OutputLock(out, grace=0.3).acquire()
        assert time.monotonic() - started < 5
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            OutputLock(out).acquire().release()
            break
        except OutputBusyError:
            time.sleep(0.05)
    else:
        raise AssertionError("the lock was not freed when its last holder died")


def process_pid(out):
    with open(str(out) + ".lock") as f:
        return json.load(f)["pid"]


@pytest.mark.slow
def test_processes_holding_names_other_processes_only(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with open(path):
        assert processes_holding(path) == []  # this process is left out
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nf = open(sys.argv[1])\n"
                                   "print('open', flush=True)\ntime.sleep(60)", str(path)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            [(pid, command)] = processes_holding(path)
            assert pid == holder.pid and "f = open(sys.argv[1])" in command
        finally:
            holder.kill()
            holder.wait()
    assert processes_holding(tmp_path / "missing") == []


def test_durable_replace_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    src, dst = str(tmp_path / "a.tmp"), str(tmp_path / "a")
    with open(src, "w") as f:
        f.write("complete")
    durable_replace(src, dst)
    assert events == [("fsync", src), ("replace", src, dst), ("fsync", str(tmp_path))]
    with open(dst) as f:
        assert f.read() == "complete"
