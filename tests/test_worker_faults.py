"""A dead, stopped or stuck source worker is an error naming it within seconds, never a hang; the
position survives and the next pass starts on a new pipeline.

The worker tests run twice: with workers started by fork (a process without CUDA), and by spawn, as
they are once the CUDA driver is initialised (on a GPU host the test session's
``torch.cuda.is_available()`` does that): there DALI's ``IsDriverInitialized`` is forced true."""
import os
import signal
import threading
import time

import pytest

import dali_relabel.loader
from dali_relabel.config import DataConfig
from dali_relabel.sources import BatchSource
from dali_relabel.processes import process_state
from dali_relabel.watchdog import LoaderWorkerError, describe_exit
from fault_sources import HangingBatchSource

pytest.importorskip("nvidia.dali")


@pytest.fixture
def small_set(tiny_set):
    return tiny_set.images, tiny_set.store


def _loader(small_set, **config):
    from dali_relabel.loader import ReLabelLoader

    settings = dict(image_size=16, num_threads=1, py_num_workers=1, prefetch_queue_depth=1)
    return ReLabelLoader(*small_set, batch_size=4, config=DataConfig(**{**settings, **config}), device="cpu",
                         return_rows=True)


@pytest.fixture(params=["fork", "spawn"], ids=["fork", "spawn-driver-initialised"])
def start_method(request, monkeypatch):
    """How the source workers start: ``"spawn"`` makes this process look as if it had initialised
    the CUDA driver, so ``worker_start_method`` switches the loader's workers to spawn."""
    import nvidia.dali.backend

    from dali_relabel.devices import worker_start_method

    if request.param == "spawn":
        monkeypatch.setattr(nvidia.dali.backend, "IsDriverInitialized", lambda: True)
    elif nvidia.dali.backend.IsDriverInitialized():  # a GPU host: torch.cuda.is_available() did it
        pytest.skip("the CUDA driver is initialised in this process: source workers cannot fork")
    assert worker_start_method("fork") == request.param
    return request.param


def _worker_pid(loader, start_method):
    """The pid of the loader's one source worker, after checking it was started by ``start_method``
    (a spawned worker runs multiprocessing's ``spawn_main``; a forked one runs what its parent ran)."""
    from dali_relabel.watchdog import source_workers

    workers = source_workers(loader.pipeline)
    assert len(workers) == 1
    pid = workers[0].pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        spawned = b"spawn_main" in f.read()
    assert spawned == (start_method == "spawn"), f"worker {pid} was not started by {start_method}"
    return pid


@pytest.mark.slow
def test_killed_worker_is_named_and_the_position_resumes(small_set, start_method):
    loader = _loader(small_set)
    batches = iter(loader)
    seen = [next(batches)[2].tolist() for _ in range(2)]
    pid = _worker_pid(loader, start_method)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(LoaderWorkerError, match=f"DALI source worker {pid} was killed by SIGKILL"):
        for _, _, rows in batches:
            seen.append(rows.tolist())
    assert time.monotonic() - started < 10
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["batch"] == len(seen)
    loader.load_state_dict(state)
    rest = [rows.tolist() for _, _, rows in loader]
    assert len(seen) + len(rest) == 6
    assert sorted(r for batch in seen + rest for r in batch) == list(range(24))
    assert len(list(loader)) == 6, "later passes run on the new pipeline"


@pytest.mark.slow
def test_stopped_worker_is_named(small_set, start_method):
    loader = _loader(small_set)
    batches = iter(loader)
    next(batches)
    pid = _worker_pid(loader, start_method)
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(LoaderWorkerError, match=f"DALI source worker {pid} is stopped"):
        for _ in batches:
            pass
    deadline = time.monotonic() + 5  # the loader killed the worker it abandoned
    while process_state(pid) not in ("", "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_state(pid) in ("", "Z", "X")


@pytest.mark.slow
def test_stuck_worker_times_out_naming_the_workers(small_set, start_method, monkeypatch):
    # The loader builds its source from a class a spawned worker can import (tests/fault_sources.py);
    # a monkeypatched BatchSource.__call__ would reach forked workers only.
    monkeypatch.setattr(dali_relabel.loader, "BatchSource", HangingBatchSource)
    loader = _loader(small_set, worker_timeout=2)
    started = time.monotonic()
    with pytest.raises(LoaderWorkerError, match=r"no batch for \d+ s \(timeout 2 s\); source workers: \d+ sleeping"):
        for _ in loader:
            _worker_pid(loader, start_method)
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_a_stuck_source_in_the_loaders_process_times_out_too(small_set, monkeypatch):
    released = threading.Event()
    real_produce = BatchSource.produce

    def hanging_produce(self, epoch, batch, mixing):
        if batch >= 2:
            released.wait(60)  # a store read on a file system that stopped answering
        return real_produce(self, epoch, batch, mixing)

    monkeypatch.setattr(BatchSource, "produce", hanging_produce)
    loader = _loader(small_set, py_num_workers=0, worker_timeout=2)
    started = time.monotonic()
    try:
        with pytest.raises(LoaderWorkerError, match=r"no batch for \d+ s \(timeout 2 s\); source workers: none "
                                                    r"\(the source runs in the loader's process\)"):
            for _ in loader:
                pass
        assert time.monotonic() - started < 20
    finally:
        released.set()
        loader.close()


def test_exit_descriptions():
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(None) == "is still running"


@pytest.mark.slow
def test_source_workers_die_with_the_loader_process(small_set, tmp_path):
    """A trainer killed outright, even before its first batch, leaves no source worker behind (they
    would keep its files open)."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from dali_relabel.config import DataConfig\n"
        "from dali_relabel.loader import ReLabelLoader\n"
        "from dali_relabel.watchdog import source_workers\n"
        f"loader = ReLabelLoader({small_set[0]!r}, {small_set[1]!r}, batch_size=4, device='cpu',\n"
        "                       config=DataConfig(image_size=16, num_threads=1, py_num_workers=1))\n"
        "print(*[p.pid for p in source_workers(loader.pipeline)], flush=True)\n"
        "time.sleep(60)\n")
    # killed, it cannot remove its loader's files: keep them in this test's directory
    env = dict(os.environ, TMPDIR=str(tmp_path), DALI_RELABEL_SHARED_DIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(pid) for pid in process.stdout.readline().split()]
    assert workers
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(process_state(pid) not in ("", "Z", "X") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(process_state(pid) in ("", "Z", "X") for pid in workers), "an orphaned worker lives on"


def _unblock(fifo):
    """Let a reader blocked opening ``fifo`` go (open it for writing, then close: end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader waits any more
        pass


def test_blocked_file_calls_name_the_file_a_thread_waits_for(tmp_path):
    from dali_relabel.processes import blocked_file_calls

    opening, reading = str(tmp_path / "opening.jpg"), str(tmp_path / "reading.jpg")
    os.mkfifo(opening)
    os.mkfifo(reading)
    fd = os.open(reading, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(reading, os.O_WRONLY)
    os.set_blocking(fd, True)
    threads = [threading.Thread(target=lambda: open(opening, "rb").close()),
               threading.Thread(target=lambda: os.read(fd, 1))]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = {(call, path) for _, call, path in blocked_file_calls()}
            if {("open", opening), ("read", reading)} <= found:
                break
            time.sleep(0.05)
        assert ("open", opening) in found and ("read", reading) in found
    finally:
        _unblock(opening)
        os.write(writer, b"x")
        for thread in threads:
            thread.join(10)
        os.close(writer)
        os.close(fd)


@pytest.mark.slow
def test_a_source_blocked_on_a_file_times_out_naming_it(small_set, monkeypatch, tmp_path):
    fifo = str(tmp_path / "hung.jpg")
    os.mkfifo(fifo)  # like a file on a mount that stopped answering: opening it never returns
    real_produce = BatchSource.produce

    def blocked_produce(self, epoch, batch, mixing):
        if batch >= 2:
            open(fifo, "rb").close()
        return real_produce(self, epoch, batch, mixing)

    monkeypatch.setattr(BatchSource, "produce", blocked_produce)
    loader = _loader(small_set, py_num_workers=0, worker_timeout=2)
    try:
        with pytest.raises(LoaderWorkerError, match=rf"no batch for \d+ s \(timeout 2 s\); waiting to open {fifo}"):
            for _ in loader:
                pass
    finally:
        _unblock(fifo)
        loader.close()


_BLOCKED_PIPELINE = """
import os, sys
import numpy as np
from nvidia.dali import fn, pipeline_def
from dali_relabel.watchdog import LoaderWorkerError, PipelineGuard, shutdown_pipeline, source_workers

fifo, workers = sys.argv[1], int(sys.argv[2])

def blocking(x):
    open(fifo, "rb").close()  # blocks one of DALI's executor threads (as a read on a hung mount would)
    return x

def sample(info):
    return np.zeros(1, np.uint8)

@pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True, py_num_workers=max(workers, 1),
              py_start_method="fork")
def graph():
    source = fn.external_source(source=sample, parallel=True, batch=False) if workers else \
        fn.external_source(source=lambda: [np.zeros(1, np.uint8)], batch=True)
    return fn.python_function(source, function=blocking)

pipe = graph()
if workers:
    pipe.start_py_workers()
pipe.build()
guard = PipelineGuard(lambda: source_workers(pipe), timeout=1, poll=0.1, pipeline=lambda: pipe)
try:
    guard.call(pipe.run)
except LoaderWorkerError as error:
    print(error, flush=True)
shutdown_pipeline(pipe, blocked=True)  # what the loader's close does next
print("closed", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_the_process_exits_after_a_pipeline_blocked_in_a_read_is_abandoned(tmp_path, workers):
    """DALI shuts every pipeline down at exit, joining its threads: one blocked in a read would hold
    the exit forever. The abandoned pipeline is left alone, and the process ends normally. With a
    source worker (killed by the guard), closing its pool must not wait for it either."""
    import subprocess
    import sys

    fifo = str(tmp_path / "hung.jpg")
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, "-c", _BLOCKED_PIPELINE, fifo, str(workers)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"the process did not exit after its pipeline was abandoned:\n{out}")
    assert process.returncode == 0, out
    assert f"waiting to open {fifo}" in out and "closed" in out


_HUNG_FIFO = {"path": None}


def _produce_blocked_on_the_fifo(self, epoch, batch, mixing):
    if batch >= 2 and _HUNG_FIFO["path"] and os.path.exists(_HUNG_FIFO["path"]):
        open(_HUNG_FIFO["path"], "rb").close()
    return _REAL_PRODUCE(self, epoch, batch, mixing)


_REAL_PRODUCE = BatchSource.produce


@pytest.mark.slow
def test_a_worker_blocked_on_a_file_is_named_and_the_next_pass_runs(small_set, monkeypatch, tmp_path):
    """The worker's blocked open is named; closing its pool afterwards must not hang (DALI's pool
    observer, told to close before it saw the killed worker, waited forever), and the next pass runs."""
    fifo = str(tmp_path / "hung.jpg")
    os.mkfifo(fifo)
    _HUNG_FIFO["path"] = fifo
    monkeypatch.setattr(BatchSource, "produce", _produce_blocked_on_the_fifo)  # inherited by the fork
    loader = _loader(small_set, worker_timeout=2)
    try:
        with pytest.raises(LoaderWorkerError, match=rf"waiting to open {fifo}.*source workers: \d+"):
            for _ in loader:
                pass
        loader.close()  # at once: the pool is closed before its observer could see the killed worker
        os.remove(fifo)
        assert len(list(loader)) >= len(loader) - 2, "the next pass runs on a new pipeline"
    finally:
        _HUNG_FIFO["path"] = None
        loader.close()
