"""Source callbacks with a fault built in, for tests/test_worker_faults.py.

They live at module level in a module of their own because a DALI source worker started by *spawn*
(the case once the CUDA driver is initialised, see ``dali_relabel.devices.worker_start_method``)
unpickles its source by importing the class: a monkeypatch of ``BatchSource`` reaches forked workers
only. ``tests/`` is on the spawned worker's ``sys.path`` (spawn copies the parent's)."""
from __future__ import annotations

import time

from dali_relabel.sources import BatchSource


class HangingBatchSource(BatchSource):
    """A :class:`BatchSource` whose call for iteration ``hang_from`` or later sleeps
    ``hang_seconds`` (a store read on a file system that stopped answering)."""

    hang_from = 2
    hang_seconds = 60.0

    def __call__(self, batch_info):
        if batch_info.iteration >= self.hang_from:
            time.sleep(self.hang_seconds)
        return super().__call__(batch_info)
