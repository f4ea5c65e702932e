"""One daemon thread running submitted calls in order, each answered by a future.

Unlike ``ThreadPoolExecutor``'s threads, a call blocked forever (a dead DALI worker, a hung network
file system) never holds up the interpreter's exit. A :class:`CallThread` dropped without
:meth:`~CallThread.shutdown` ends its thread all the same (a finalizer), so a dropped loader leaves
no thread behind: a thread left waiting would also keep the heap arena it allocated DALI's outputs in.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import weakref
from typing import Callable


#: What the name of a thread left in a call that may never return ends with (:meth:`CallThread.abandon`).
ABANDONED = "-abandoned"


class CallThread:
    """A daemon thread named ``name`` that runs :meth:`submit`-ted calls one after another."""

    def __init__(self, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        # The thread holds only the queue, so an abandoned CallThread can still be collected, and
        # its finalizer then ends the thread.
        self._thread = threading.Thread(target=_run, args=(self._tasks,), name=name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._tasks.put, None)

    def submit(self, function: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, function))
        return future

    def abandon(self) -> None:
        """Give up on the call running now, which may never return (a DALI call waiting for a dead
        worker): the thread ends when it does, and is named ``<name>-abandoned`` meanwhile."""
        self._thread.name += ABANDONED
        self.shutdown()

    def shutdown(self) -> None:
        """The thread ends after the calls already submitted (once: a second call does nothing)."""
        self._finalizer()


def _run(tasks: queue.SimpleQueue) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        future, function = task
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(function())
        except BaseException as error:  # handed to the waiting caller
            future.set_exception(error)
        del task, future, function  # nothing of a finished call outlives it here
