"""A dead or stuck DALI source worker becomes an error naming it, never a hang.

With ``DataConfig.py_num_workers >= 1`` DALI runs the batch source in worker processes. If one is
killed (the OOM killer, a stray ``kill -9``), DALI's pipeline can block forever inside its task queue,
or report only "Worker data receiving interrupted" after seconds. :class:`PipelineGuard` runs the
pipeline's calls on a helper thread and waits for them in short slices; between slices it looks at
the workers: one that exited (with its exit code or signal), one stopped by a signal, or no batch for
``timeout`` seconds, ends the wait with a :class:`LoaderWorkerError` saying which worker and what
happened. The blocked call is abandoned on its thread; the loader builds a new pipeline for its next
pass. With the source in the loader's process (no workers) the timeout still catches a pipeline that
hangs, for example on a file system that stopped answering.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Callable, List, Optional

from .call_thread import CallThread
from .errors import DaliRelabelError
from .processes import STATE_NAMES, process_state


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
    they exit) and, unless a call is still ``blocked`` inside it, the pipeline itself and the helper
    threads of its in-process sources (a callback with a ``close()``, such as
    :class:`~dali_relabel.prefetch.PrefetchingSource`): DALI's pipeline holds them in reference
    cycles, so without this they would live until the next garbage collection."""
    pool = getattr(pipeline, "_py_pool", None)
    if pool is not None:
        try:
            pool.close()
        except Exception:  # already closed, or never started
            pass
    if not blocked:
        try:
            pipeline._shutdown()
        except Exception:
            pass
        for group in getattr(pipeline, "_input_callbacks", None) or []:  # DALI 2.x keeps them here
            close = getattr(getattr(group, "callback", None), "close", None)
            if callable(close):
                close()


class PipelineGuard:
    """Runs calls on a helper thread; gives up on them when a source worker is dead or stuck.

    Args:
        workers: returns the current source worker processes.
        timeout: seconds a call may wait before the loader calls its workers stuck (``0``: no limit;
            dead and stopped workers are still reported).
        poll: seconds between looks at the workers.
    """

    def __init__(self, workers: Callable[[], List], timeout: float = 300.0, poll: float = 0.25):
        self._workers = workers
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
            states = ", ".join(f"{p.pid} {STATE_NAMES.get(process_state(p.pid), 'gone')}" for p in self._workers())
            states = states or "none (the source runs in the loader's process)"
            return f"no batch for {waited:.0f} s (timeout {self.timeout:g} s); source workers: {states}"
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
        for process in self._workers():
            if process.exitcode is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except OSError:
                    pass
        self._executor.abandon()
        self._executor = self._new_executor()

    def close(self) -> None:
        self._executor.shutdown()
