"""The guard in conftest.py that keeps the inner loop (`-m "not slow"`) fast: a test without the `slow`
mark is refused DALI pipelines, processes and network connections, by name."""
import multiprocessing
import socket
import subprocess
import sys

import pytest

from conftest import SlowWorkOutsideSlowTest, _SlowWorkGuard


def _refused(action, what):
    with pytest.raises(SlowWorkOutsideSlowTest, match=rf"test_slow_guard.py::\S+ {what} but is not marked slow"):
        action()
    _SlowWorkGuard.seen.clear()  # expected here: the test must not fail for it


def test_an_unmarked_test_cannot_build_or_run_a_dali_pipeline():
    dali = pytest.importorskip("nvidia.dali")

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        return dali.fn.random.uniform(shape=[1])

    pipe = graph()
    _refused(pipe.build, "builds or runs a DALI pipeline")
    _refused(pipe.run, "builds or runs a DALI pipeline")


def test_an_unmarked_test_cannot_start_a_process():
    _refused(lambda: subprocess.run([sys.executable, "-c", "pass"]), "starts a subprocess")
    process = multiprocessing.get_context("fork").Process(target=print)
    _refused(process.start, "starts a process")


def test_an_unmarked_test_cannot_connect_to_the_network():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        _refused(lambda: sock.connect(("127.0.0.1", 9)), "connects to the network")
