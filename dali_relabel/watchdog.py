"""A dead or stuck DALI source worker becomes an error naming it, never a hang.

With ``DataConfig.py_num_workers >= 1`` DALI runs the batch source in worker processes. If one is
killed (the OOM killer, a stray ``kill -9``), DALI's pipeline can block forever inside its task queue,
or report only "Worker data receiving interrupted" after seconds. :class:`PipelineGuard` runs the
pipeline's calls on a helper thread and waits for them in short slices; between slices it looks at
the workers: one that exited (with its exit code or signal), one stopped by a signal, or no batch for
``timeout`` seconds, ends the wait with a :class:`LoaderWorkerError` saying which worker and what
happened. The blocked call is abandoned on its thread; the loader builds a new pipeline for its next
pass. With the source in the loader's process (no workers) the timeout still catches a pipeline that
hangs, for example on a file system that stopped answering; the message then names the files that
threads of the loader (or of its workers) wait to open or read (:func:`blocked_files`).

A pipeline abandoned with a call still blocked inside it is never shut down (:func:`abandon_pipeline`):
DALI's shutdown (at ``del``, and for every live pipeline at the interpreter's exit) joins the
pipeline's threads, one of which may never return from its read, and the process would never exit.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Callable, List, Optional

from .call_thread import CallThread
from .errors import DaliRelabelError
from .processes import STATE_NAMES, blocked_file_calls, process_state

def abandon_pipeline(pipeline) -> None:
    """Detach ``pipeline`` from its C++ pipeline, which is left alive to the end of the process and
    never shut down: DALI's ``Shutdown`` waits for the pipeline's threads, and a thread blocked in a
    read on a file system that stopped answering never returns. The Python object can then be
    dropped, and DALI's exit handler (which shuts down every registered pipeline) skips it; the
    process exits normally, and the operating system reclaims what the abandoned pipeline held."""
    import ctypes
    import weakref

    handle = getattr(pipeline, "_pipe", None)
    if handle is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(handle))  # never destroyed, so never joined
        pipeline._pipe = None
    registry = getattr(type(pipeline), "_pipes", None)
    if isinstance(registry, set):
        registry.discard(weakref.ref(pipeline))
    # The kept C++ pipeline holds its in-process sources forever: let their helper threads go.
    for group in getattr(pipeline, "_input_callbacks", None) or []:
        abandon = getattr(getattr(group, "callback", None), "abandon", None)
        if callable(abandon):
            abandon()


def blocked_files(pids: Optional[List[int]] = None) -> str:
    """``"waiting to open /a.jpg; waiting to read /b.jpg"`` for the threads of this process (and of
    ``pids``) blocked opening or reading a file; ``""`` if none (pipes, sockets and devices are left
    out: they are how the loader's own parts talk)."""
    found = []
    for pid in [None] + list(pids or []):
        for _, call, path in blocked_file_calls(pid):
            if path.startswith("/") and not path.startswith(("/dev/", "/proc/", "/sys/")):
                entry = f"waiting to {call} {path}"
                if entry not in found:
                    found.append(entry)
    return "; ".join(found)


class LoaderWorkerError(DaliRelabelError, RuntimeError):
    """A DALI source worker of a loader died, was stopped, or produced nothing for too long."""


def describe_exit(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def source_workers(pipeline) -> List:
    """The ``multiprocessing.Process`` objects of a pipeline's source workers (``[]`` if DALI keeps
    them elsewhere than in 2.x's ``_py_pool.pool._processes``)."""
    pool = getattr(getattr(pipeline, "_py_pool", None), "pool", None)
    return list(getattr(pool, "_processes", None) or [])


def shutdown_pipeline(pipeline, blocked: bool = False) -> None:
    """Stop a pipeline's source workers now (they hold inherited file descriptors and locks until
    they exit) and the pipeline itself, and the helper threads of its in-process sources (a callback
    with a ``close()``, such as :class:`~dali_relabel.prefetch.PrefetchingSource`): DALI's pipeline
    holds them in reference cycles, so without this they would live until the next garbage
    collection. With a call still ``blocked`` inside it, the pipeline is abandoned instead
    (:func:`abandon_pipeline`)."""
    pool = getattr(pipeline, "_py_pool", None)
    if pool is not None:
        try:
            pool.close()
        except Exception:  # already closed, or never started
            pass
    if blocked:
        abandon_pipeline(pipeline)
        return
    try:
        pipeline._shutdown()
    except Exception:
        pass
    for group in getattr(pipeline, "_input_callbacks", None) or []:  # DALI 2.x keeps them here
        close = getattr(getattr(group, "callback", None), "close", None)
        if callable(close):
            close()


def _wait_for_pool_observer(pipeline, timeout: float = 10.0) -> None:
    """Let the thread that watches a pipeline's source workers see that they died, before anything
    closes their pool. Told to close first, that thread would wake a task queue's waiters "gently",
    and a worker killed while it waited on the queue never answers: the close, at the latest in
    the pool's finalizer at the interpreter's exit, would wait forever (DALI 2.4's ``Observer``)."""
    pool = getattr(getattr(pipeline, "_py_pool", None), "pool", None)
    thread = getattr(getattr(pool, "_observer", None), "thread", None)
    if thread is not None:
        thread.join(timeout)


class PipelineGuard:
    """Runs calls on a helper thread; gives up on them when a source worker is dead or stuck.

    Args:
        workers: returns the current source worker processes.
        timeout: seconds a call may wait before the loader calls its workers stuck (``0``: no limit;
            dead and stopped workers are still reported).
        poll: seconds between looks at the workers.
        pipeline: returns the pipeline the calls run in; it is abandoned (:func:`abandon_pipeline`)
            when a call is, so that neither dropping it nor the process's exit waits for that call.
    """

    def __init__(self, workers: Callable[[], List], timeout: float = 300.0, poll: float = 0.25,
                 pipeline: Optional[Callable[[], object]] = None):
        self._workers = workers
        self._pipeline = pipeline
        self.timeout = timeout
        self.poll = poll
        self._executor = self._new_executor()
        self.broken = False  # a call was abandoned: the pipeline must not be used again

    @staticmethod
    def _new_executor() -> CallThread:
        return CallThread("dali-relabel-pipeline")

    def problem(self, waited: float) -> Optional[str]:
        """What is wrong with the workers after a call waited ``waited`` seconds, or ``None``."""
        for process in self._workers():
            exitcode = process.exitcode
            if exitcode is not None:
                return f"DALI source worker {process.pid} {describe_exit(exitcode)}"
            state = process_state(process.pid)
            if state in ("T", "t"):
                return f"DALI source worker {process.pid} is {STATE_NAMES[state]}"
        if self.timeout and waited > self.timeout:
            workers = self._workers()
            states = ", ".join(f"{p.pid} {STATE_NAMES.get(process_state(p.pid), 'gone')}" for p in workers)
            states = states or "none (the source runs in the loader's process)"
            files = blocked_files([p.pid for p in workers])
            files = f"; {files} (a file system that stopped answering?)" if files else ""
            return f"no batch for {waited:.0f} s (timeout {self.timeout:g} s){files}; source workers: {states}"
        return None

    def call(self, function: Callable):
        """``function()`` on the helper thread; raises :class:`LoaderWorkerError` instead of hanging."""
        if self.broken:
            raise LoaderWorkerError("this pipeline was abandoned after a worker failure")
        future = self._executor.submit(function)
        started = time.monotonic()
        while True:
            try:
                return future.result(timeout=self.poll)
            except concurrent.futures.TimeoutError:
                problem = self.problem(time.monotonic() - started)
                if problem is not None:
                    self._abandon()
                    raise LoaderWorkerError(problem) from None
            except RuntimeError as error:
                problem = self.problem(0.0)
                if problem is None:
                    raise
                self._abandon()
                raise LoaderWorkerError(f"{problem} ({error})") from error

    def _abandon(self) -> None:
        """Leave the blocked call on its thread, stop the workers, and take a fresh thread."""
        self.broken = True
        pipeline = self._pipeline() if self._pipeline is not None else None
        if pipeline is not None:
            abandon_pipeline(pipeline)
        for process in self._workers():
            if process.exitcode is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except OSError:
                    pass
        if pipeline is not None:
            _wait_for_pool_observer(pipeline)
        self._executor.abandon()
        self._executor = self._new_executor()

    def close(self) -> None:
        self._executor.shutdown()
