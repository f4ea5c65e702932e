"""The session-end check (tests/leftovers.py) sees a thread, a child process and a temporary file
that a test left behind, and nothing once they are gone."""
import os
import subprocess
import sys
import tempfile
import threading

import pytest

import leftovers


def test_a_thread_of_ours_left_running_is_reported_until_it_ends():
    start = leftovers.snapshot()
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="dali-relabel-left", daemon=True)
    thread.start()
    try:
        found = leftovers.find(start, wait=0.5)
        assert any("'dali-relabel-left'" in item for item in found), found
    finally:
        release.set()
        thread.join()
    assert leftovers.find(start, wait=0.5) == []


def test_a_temporary_file_is_reported_until_removed():
    start = leftovers.snapshot()
    fd, path = tempfile.mkstemp(prefix="left_")
    os.close(fd)
    try:
        assert f"temporary file {path}" in leftovers.find(start, wait=0.5)
    finally:
        os.unlink(path)
    assert leftovers.find(start, wait=0.5) == []


def test_the_session_has_temporary_directories_of_its_own():
    """Other sessions' files cannot be mistaken for this one's (conftest.py started the session)."""
    assert os.path.basename(tempfile.gettempdir()).startswith("dali-relabel-tests-")
    assert os.environ["TMPDIR"] == tempfile.gettempdir()
    from dali_relabel.sources import EpochControl

    control = EpochControl()
    try:
        assert os.path.basename(os.path.dirname(control.path)).startswith("dali-relabel-tests-shm-")
    finally:
        control.close()


@pytest.mark.slow
def test_a_child_process_left_running_is_reported_until_it_is_reaped():
    start = leftovers.snapshot()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = leftovers.find(start, wait=0.5)
        assert any(item.startswith(f"child process {child.pid}") for item in found), found
    finally:
        child.kill()
        child.wait()
    assert leftovers.find(start, wait=0.5) == []
