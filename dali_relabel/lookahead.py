"""No stall at epoch ends: the next pass's first batches are made before the current pass ends.

Its order is known as soon as a pass starts: unless ``set_epoch`` or ``load_state_dict`` say
otherwise, the next pass reads the next epoch from its first batch, with the same mixing switch
(:meth:`~dali_relabel.loader_state.LoaderState._next_pass`). So neither loader waits for it:

- the tree loaders (:class:`~dali_relabel.passes.PipelineBatches`) read one :class:`Stream` per DALI
  epoch of their pipeline: it starts where a pass starts and runs on through the following epochs
  (the source never ends the DALI epoch between passes, :class:`~dali_relabel.sources.EpochControl`),
  and the loader counts each pass's batches itself. A pass that starts where the stream stands takes
  the batches DALI made ahead; any other (another epoch or batch, another mixing switch, a position
  resumed inside an epoch) stops the stream, drains what was made ahead unseen, and starts a new DALI
  epoch where the pass starts. A stream opened for a resumed pass (its own count of batches, elastic
  resume) runs on after that pass's end into the following epochs, each read whole;
- the shard loaders (:mod:`dali_relabel.shard_loader`), which need a pipeline per epoch (its shard
  order), build the next epoch's pipeline on a helper thread while the current pass takes its last
  batches (:class:`PipelineAhead`), early enough to be ready (:class:`Pace`); a pass that
  does not start where it was built for (the next epoch from its start) drops it.
"""
from __future__ import annotations

import collections
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Deque, Hashable, Optional, Tuple

from .call_thread import CallThread

__all__ = ["locate", "Stream", "PipelineAhead", "Pace", "batches_ahead"]


def locate(epoch: int, position: int, batches_per_epoch: int, end: Optional[int] = None) -> Tuple[int, int]:
    """``(epoch, batch)`` of stream position ``position`` counted from batch 0 of ``epoch``.

    ``end``: where the stream's first pass over ``epoch`` ends (default ``batches_per_epoch``; a pass
    resumed on another shape has another count, :class:`~dali_relabel.loader_state.Start`). The
    positions before it are that pass's batches; from it on come the following epochs, each read
    whole from its start."""
    end = batches_per_epoch if end is None else end
    if position < end:
        return int(epoch), int(position)
    past = position - end
    return int(epoch + 1 + past // batches_per_epoch), int(past % batches_per_epoch)


@dataclass
class Stream:
    """The batches one DALI epoch of a tree loader's pipeline reads: from batch ``first`` of
    ``epoch`` on, through the following epochs, with one ``mixing`` switch; ``taken``: outputs the
    loader took from it so far.

    ``end``: where its first pass ends (default: the epoch's end, ``batches_per_epoch``);
    ``resumed``: that pass starts inside the epoch's global order (a resumed
    :class:`~dali_relabel.loader_state.Start`), so its batches are no whole epoch's and no other pass
    reads on in them."""

    epoch: int
    first: int
    mixing: bool
    batches_per_epoch: int
    taken: int = 0
    end: Optional[int] = None
    resumed: bool = False

    @property
    def position(self) -> int:
        """The position of the next output, counted from batch 0 of :attr:`epoch`."""
        return self.first + self.taken

    @property
    def in_first_pass(self) -> bool:
        """Whether the next output is still one of the first pass's batches."""
        return self.position < (self.batches_per_epoch if self.end is None else self.end)

    def next_batch(self) -> Tuple[int, int]:
        """``(epoch, batch)`` of the next output."""
        return locate(self.epoch, self.position, self.batches_per_epoch, self.end)

    def continues(self, epoch: int, first: int, mixing: bool, mixing_matters: bool = True) -> bool:
        """Whether a pass over ``epoch`` from batch ``first`` (of a whole epoch) with ``mixing`` reads
        on where this stream stands (``mixing_matters``: the source's batches depend on the switch)."""
        if self.resumed and self.in_first_pass:
            return False  # the stream stands inside a resumed pass: its batches are that pass's own
        return self.next_batch() == (epoch, first) and (self.mixing == mixing or not mixing_matters)


class PipelineAhead:
    """A pipeline built on a helper thread for the pass ``key`` names, before that pass starts.

    Args:
        key: what the pass must be for the pipeline to serve it (epoch, batch, checkpoint, mixing).
        build: ``() -> object``: builds the pipeline and schedules its first runs (on the thread).
        drop: ``object -> None``: releases a pipeline nobody will read.
    """

    def __init__(self, key: Hashable, build: Callable[[], object], drop: Callable[[object], None]):
        self.key = key
        self._drop = drop
        self._thread = CallThread("dali-relabel-next-pipeline")
        self._future = self._thread.submit(build)
        self._thread.shutdown()  # the thread ends after the build

    def take(self, key: Hashable) -> Optional[object]:
        """The pipeline if ``key`` is the one it was built for and its build succeeded, else ``None``
        (then it is dropped; a failed build is left to the caller's own build, which reports it)."""
        future, self._future = self._future, None
        if future is None:
            return None
        try:
            made = future.result()
        except Exception:
            return None
        if key == self.key:
            return made
        self._drop(made)
        return None

    def drop(self) -> None:
        """Wait for the build and release what it made."""
        self.take(object())



class Pace:
    """When a shard loader starts building the next pass's pipeline: what a pipeline took from the
    start of its build to its first batch, and the time between batches (the median of the last
    few, so neither prefetched batches nor a pause of the training loop sway it).

    Args:
        scheduled: batches a running pipeline computes ahead (its prefetch depth).
    """

    def __init__(self, scheduled: int):
        self.scheduled = scheduled
        self.startup: Optional[float] = None
        self._intervals: Deque[float] = collections.deque(maxlen=16)
        self._started = self._last = None
        self._timed = False

    def pass_started(self) -> None:
        """A pass starts (before its pipeline is taken or built)."""
        self._started, self._last, self._timed = time.monotonic(), None, False

    def pipeline_taken(self, built_now: bool) -> None:
        """``built_now``: the pass got a pipeline built for it now, whose start-up is timed."""
        self._timed = built_now

    def batch_taken(self) -> None:
        now = time.monotonic()
        if self._last is None:
            if self._timed:  # the whole start-up: the build, the reader's fill, the first batch
                self.startup = now - self._started
        else:
            self._intervals.append(now - self._last)
        self._last = now

    def batches_ahead(self) -> int:
        """How many batches before the pass's end to start (:func:`batches_ahead`)."""
        batch_seconds = statistics.median(self._intervals) if self._intervals else None
        return batches_ahead(self.startup, batch_seconds, self.scheduled)


def batches_ahead(startup_seconds: Optional[float], batch_seconds: Optional[float], scheduled: int) -> int:
    """How many batches before a pass's end to start building the next pass's pipeline.

    Args:
        startup_seconds: what a pipeline took from the start of its build to its first batch
            (``None``: not known yet).
        batch_seconds: the time between two batches of the running pass (``None``: not known yet).
        scheduled: batches the running pipeline computes ahead (its prefetch depth): once that few
            are left, it has nothing more to schedule, so the build costs the pass nothing.

    Twice the start-up time's worth of batches (a margin for a machine busier than when it was
    measured), and never fewer than ``scheduled``: late enough that a long epoch does not keep two
    pipelines (and two shuffle buffers) for long, early enough that the next one is ready in time.
    """
    if not startup_seconds or not batch_seconds:
        return scheduled
    return max(scheduled, math.ceil(2.0 * startup_seconds / batch_seconds))
