"""Where a loader stands between passes: the part that makes it a drop-in ``DataLoader``.

:class:`LoaderState` is the one base of every loader: the tree loaders
(:class:`~dali_relabel.loader.ReLabelLoader`, :class:`~dali_relabel.loader.ValidationLoader`, through
:class:`~dali_relabel.passes.PipelineBatches`) and the shard loaders (:mod:`dali_relabel.shard_loader`).
It holds the epoch the next pass reads and the batch it starts at, and with them ``len()``,
``set_epoch``, ``state_dict``/``load_state_dict`` (one set of resume rules and messages for every
loader) and the ``sampler``/``dataset`` shims that training scripts call (:class:`LoaderSampler`,
:class:`LoaderDataset`). Subclasses run the passes: each ``iter()`` takes
:meth:`LoaderState._next_pass` and counts the batches it yields on the :class:`Pass`.

It also holds a loader's life: ``close()`` (and ``with loader:``) releases what the loader runs, and a
loader belongs to the process that built it: a forked child that uses it is told so at once
(:class:`LoaderProcessError`), instead of waiting for threads that a fork does not copy.
"""
from __future__ import annotations

import abc
import os
import weakref
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .errors import DaliRelabelError


class LoaderProcessError(DaliRelabelError, RuntimeError):
    """A loader used in another process than the one that built it (a forked child): its pipeline's
    threads did not come along, so the child must build its own loader."""


class ResumeError(DaliRelabelError, ValueError):
    """A saved data position that this loader cannot continue from (other settings, or a shard
    position without its DALI checkpoint)."""


@dataclass
class Pass:
    """One pass (an ``iter()``) over a loader."""

    epoch: int
    first: int  # the epoch's batch the pass starts at
    mixing: bool = True  # CutMix/Mixup switched on for this pass
    consumed: int = 0  # batches taken from the pipeline so far
    finished: bool = False
    checkpoint: Optional[str] = None  # DALI's checkpoint of the pass's start (base64; shard loaders)
    iterator: object = None  # the DALI iterator the pass reads, where a loader keeps one per pass


class LoaderState(abc.ABC):
    """The DataLoader-like position of a loader: the epoch and batch the next pass starts at.

    Args:
        batches_per_epoch: batches of a whole epoch on this rank (the same on every rank).
        start_epoch, resume_batch: where the first pass starts (``resume_batch`` batches of
            ``start_epoch`` already trained on; the epoch's end is the next epoch's start).

    A state (:meth:`state_dict`) is ``{"epoch", "batch", "dali_checkpoint", **fingerprint}``: the
    position, DALI's checkpoint of it where the loader's reader keeps its own position (shard
    loaders; ``None`` otherwise), and the settings that must not change for that position to mean
    the same samples (:meth:`_fingerprint`).

    Subclasses give :meth:`_fingerprint`, :attr:`samples_per_rank` and :meth:`epoch_rows`, stop a
    running pass in :meth:`_end_pass`, and (with ``keeps_checkpoints``) read DALI's checkpoint of a
    running pass in :meth:`_pass_checkpoint`.
    """

    #: The position inside an epoch is DALI's checkpoint (else the epoch and batch fix it alone).
    keeps_checkpoints = False

    def __init__(self, batches_per_epoch: int, start_epoch: int = 0, resume_batch: int = 0):
        if not 0 <= resume_batch <= batches_per_epoch:
            raise ValueError(f"resume_batch {resume_batch} is outside the epoch's {batches_per_epoch} batches")
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self._first_batch = self._normalise(start_epoch, resume_batch)
        self._checkpoint: Optional[str] = None  # DALI's checkpoint of the next pass's start
        self._pass: Optional[Pass] = None
        self.sampler = LoaderSampler(self)
        self.batch_sampler = None
        self._built_in = os.getpid()

    # -- the loader's life ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release what the loader runs now (pipelines, threads, source workers, files) rather than
        when it is collected; a later ``iter()`` starts afresh from the position."""
        self._pass = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_process(self) -> None:
        """Refuse, at once, use in another process than the one that built the loader."""
        if os.getpid() != self._built_in:
            raise LoaderProcessError(f"this loader was built in process {self._built_in} and is used in process "
                                     f"{os.getpid()}: a forked child must build its own loader (the pipeline's "
                                     "threads and workers stay with the process that started them)")

    # -- what subclasses say ------------------------------------------------------------------------
    @abc.abstractmethod
    def _fingerprint(self) -> dict:
        """The settings a saved position is only valid with (batch size, ranks, seed, data...)."""

    @property
    @abc.abstractmethod
    def samples_per_rank(self) -> int:
        """Samples of an epoch on this rank (``len(loader.sampler)``)."""

    @abc.abstractmethod
    def epoch_rows(self, epoch: int) -> List[int]:
        """This rank's rows of ``epoch`` in the order a pass reads them (iterating ``loader.sampler``)."""

    def _end_pass(self) -> None:
        """Stop the running pass (if any) at the batch it reached."""
        self._pass = None

    def _pass_checkpoint(self, current: Pass) -> Optional[str]:
        """DALI's checkpoint (base64) of where the running pass ``current`` stands."""
        return None

    # -- the position -------------------------------------------------------------------------------
    def _normalise(self, epoch: int, batch: int) -> Tuple[int, int]:
        """``batch == batches_per_epoch`` is the next epoch's start."""
        return (epoch + 1, 0) if batch >= self.batches_per_epoch else (epoch, batch)

    def __len__(self) -> int:
        """Batches the next pass yields (fewer in an epoch resumed mid-way; padding-only batches of
        a small last shard count too)."""
        return self.batches_per_epoch - self._first_batch

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (its order, crops and CutMix boxes). Setting the epoch a
        resumed position belongs to keeps that position."""
        if epoch != self.epoch:
            self.epoch, self._first_batch, self._checkpoint = int(epoch), 0, None

    def _next_pass(self, mixing: bool = True) -> Pass:
        """The pass an ``iter()`` starts (now the running one); the pass after it reads the next
        epoch from its start unless ``set_epoch`` or ``load_state_dict`` say otherwise."""
        self._check_process()
        current = Pass(self.epoch, self._first_batch, mixing, checkpoint=self._checkpoint)
        self.epoch, self._first_batch, self._checkpoint = current.epoch + 1, 0, None
        self._pass = current
        return current

    def state_dict(self) -> dict:
        """Where the data order stands: the epoch, the batches of it already yielded (by the running
        pass, else before the next one) and DALI's checkpoint of that position where the loader keeps
        one, plus what must not change for that position to mean the same samples."""
        current = self._pass
        if current is not None and not current.finished:
            epoch, batch = self._normalise(current.epoch, current.first + current.consumed)
            if batch == 0 or not self.keeps_checkpoints:
                checkpoint = None
            elif current.consumed == 0:
                checkpoint = current.checkpoint
            else:
                checkpoint = self._pass_checkpoint(current)
        else:
            epoch, batch, checkpoint = self.epoch, self._first_batch, self._checkpoint
        return {"epoch": epoch, "batch": batch, "dali_checkpoint": checkpoint, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s position (a running pass is stopped). Refuses, with
        :class:`ResumeError`, a state made with other settings (another batch size or world size
        would silently skip or repeat samples), and a mid-epoch state without the DALI checkpoint
        that a loader keeping checkpoints needs."""
        mine = self._fingerprint()
        differ = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ResumeError(f"cannot resume the data position with other settings ({detail}); resume "
                              "with the saved settings or start the epoch again")
        epoch, batch = self._normalise(int(state["epoch"]), int(state["batch"]))
        checkpoint = state.get("dali_checkpoint") if batch else None
        if self.keeps_checkpoints and batch and not checkpoint:
            raise ResumeError(f"cannot resume at batch {batch} of epoch {epoch}: the state has no DALI "
                              "checkpoint of that position (only this loader's own state_dict has one); "
                              "start the epoch again")
        self._end_pass()
        self.epoch, self._first_batch, self._checkpoint = epoch, batch, checkpoint


class LoaderSampler:
    """What ``loader.sampler`` is to a training script: ``set_epoch`` (as on a ``DistributedSampler``;
    it sets the loader's epoch), ``len()`` (this rank's samples per epoch) and iteration over this
    rank's rows of the coming epoch."""

    def __init__(self, loader: LoaderState):
        self._loader = weakref.ref(loader)  # no cycle: dropping the loader stops its workers

    def set_epoch(self, epoch: int) -> None:
        self._loader().set_epoch(epoch)

    def __len__(self) -> int:
        return self._loader().samples_per_rank

    def __iter__(self):
        loader = self._loader()
        return iter(loader.epoch_rows(loader.epoch))


class LoaderDataset:
    """What ``loader.dataset`` is to a training script: the image set's size and classes.

    ``len()`` counts the images of all ranks (like a ``Dataset`` wrapped by a ``DistributedSampler``);
    ``classes`` and ``class_to_idx`` are torchvision ``ImageFolder``'s.
    """

    def __init__(self, root: str, classes: Sequence[str], num_samples: int):
        self.root = root
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self._num_samples = num_samples

    def __len__(self) -> int:
        return self._num_samples

    def __repr__(self) -> str:
        return f"LoaderDataset(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"
