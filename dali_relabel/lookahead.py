"""No stall at epoch ends: the next pass's first batches are made before the current pass ends.

Its order is known as soon as a pass starts: unless ``set_epoch`` or ``load_state_dict`` say
otherwise, the next pass reads the next epoch from its first batch, with the same mixing switch
(:meth:`~dali_relabel.loader_state.LoaderState._next_pass`). So neither loader waits for it:

- the tree loaders (:class:`~dali_relabel.passes.PipelineBatches`) read one :class:`Stream` per DALI
  epoch of their pipeline: it starts where a pass starts and runs on through the following epochs
  (the source never ends the DALI epoch between passes, :class:`~dali_relabel.sources.EpochControl`),
  and the loader counts each pass's batches itself. A pass that starts where the stream stands takes
  the batches DALI made ahead; any other (another epoch or batch, another mixing switch) stops the
  stream, drains what was made ahead unseen, and starts a new DALI epoch where the pass starts;
- the shard loaders (:mod:`dali_relabel.shard_loader`), which need a pipeline per epoch (its shard
  order), build the next epoch's pipeline on a helper thread while the current pass takes its last
  batches (:class:`PipelineAhead`); a pass that does not start where it was built for drops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Tuple

from .call_thread import CallThread

__all__ = ["locate", "Stream", "PipelineAhead"]


def locate(epoch: int, position: int, batches_per_epoch: int) -> Tuple[int, int]:
    """``(epoch, batch)`` of stream position ``position`` counted from batch 0 of ``epoch``."""
    return int(epoch + position // batches_per_epoch), int(position % batches_per_epoch)


@dataclass
class Stream:
    """The batches one DALI epoch of a tree loader's pipeline reads: from batch ``first`` of
    ``epoch`` on, through the following epochs, with one ``mixing`` switch; ``taken``: outputs the
    loader took from it so far."""

    epoch: int
    first: int
    mixing: bool
    batches_per_epoch: int
    taken: int = 0

    @property
    def position(self) -> int:
        """The position of the next output, counted from batch 0 of :attr:`epoch`."""
        return self.first + self.taken

    def next_batch(self) -> Tuple[int, int]:
        """``(epoch, batch)`` of the next output."""
        return locate(self.epoch, self.position, self.batches_per_epoch)

    def continues(self, epoch: int, first: int, mixing: bool, mixing_matters: bool = True) -> bool:
        """Whether a pass over ``epoch`` from batch ``first`` with ``mixing`` reads on where this
        stream stands (``mixing_matters``: the source's batches depend on the switch)."""
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
        try:
            made = self._future.result()
        except Exception:
            return None
        if key == self.key:
            return made
        self._drop(made)
        return None

    def drop(self) -> None:
        """Wait for the build and release what it made."""
        self.take(object())
