"""Where a loader stands between passes: the part that makes it a drop-in ``DataLoader``.

:class:`LoaderState` is the one base of every loader: the tree loaders
(:class:`~dali_relabel.loader.ReLabelLoader`, :class:`~dali_relabel.loader.ValidationLoader`, through
:class:`~dali_relabel.passes.PipelineBatches`) and the shard loaders (:mod:`dali_relabel.shard_loader`).
It holds the epoch the next pass reads and where in it the pass starts (a :class:`Start`), and with
them ``len()``, ``set_epoch``, ``state_dict``/``load_state_dict`` (one set of resume rules and messages
for every loader) and the ``sampler``/``dataset`` shims that training scripts call
(:class:`LoaderSampler`, :class:`LoaderDataset`). Subclasses run the passes: each ``iter()`` takes
:meth:`LoaderState._next_pass` and counts the batches it yields on the :class:`Pass`.

**The global position.** A state records the epoch and how much of that epoch's *global* order (over
all ranks) is read, so it means the same on any number of ranks and batch size (elastic resume):

* tree loaders (:class:`~dali_relabel.plan.EpochPlan`): ``position``, the samples of the epoch's
  global order read (every rank steps together, so after ``k`` batches of ``b`` on ``S`` ranks it is
  ``k * b * S``, padding not counted), and ``unread``, the positions before it still to read (only
  saved just before the last batch of a padded epoch). Every rank computes it alone;
* shard loaders: ``seen``, the rows yielded in the epoch (DALI's reader shuffles in a buffer, so no
  prefix of an order is read), per rank; :func:`merge_states` joins the ranks' states into the global
  one. ``dali_checkpoint`` (DALI's checkpoint of the rank's reader) continues exactly where the rank
  stopped when the shape is the same.

``load_state_dict`` on a loader with the saved world size and batch size continues exactly the
uninterrupted epoch; with another shape it reads the rest of the epoch, each sample once.

It also holds a loader's life: ``close()`` (and ``with loader:``) releases what the loader runs, and a
loader belongs to the process that built it: a forked child that uses it is told so at once
(:class:`LoaderProcessError`), instead of waiting for threads that a fork does not copy.
"""
from __future__ import annotations

import abc
import base64
import os
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import DaliRelabelError

#: How to start the saved epoch again instead of continuing it (named in the refusals).
RESTART_HINT = ("start the epoch again: load_state_dict(state, restart_epoch=True), or train.py "
                "--resume-restart-epoch")
#: State keys of the position and the shape (everything else a state holds is a setting it needs).
POSITION_KEYS = ("epoch", "batch", "position", "unread", "dali_checkpoint", "dali_checkpoints", "seen",
                 "seen_ranks", "world_size", "batch_size", "rank")


class LoaderProcessError(DaliRelabelError, RuntimeError):
    """A loader used in another process than the one that built it (a forked child): its pipeline's
    threads did not come along, so the child must build its own loader."""


class ResumeError(DaliRelabelError, ValueError):
    """A saved data position that this loader cannot continue from (other data settings mid-epoch,
    or a shard position that is neither its own DALI checkpoint nor every rank's rows)."""


@dataclass(frozen=True)
class Start:
    """Where a pass starts inside its epoch.

    Attributes:
        batch: the epoch's batch number of the pass's first batch (it keys CutMix/Mixup; with the
            saved world size and batch size it is the batch the uninterrupted epoch was at).
        position, unread: the epoch's global order read up to ``position``, but for the positions
            ``unread`` (tree loaders; see :meth:`~dali_relabel.plan.EpochPlan.position_after`).
        checkpoint: DALI's checkpoint (base64) of the rank's reader at ``batch`` (shard loaders, with
            the saved shape).
        seen: rows already yielded in the epoch, as a bool mask over the rows (shard loaders).
    """

    batch: int = 0
    position: int = 0
    unread: Tuple[int, ...] = ()
    checkpoint: Optional[str] = None
    seen: Optional[np.ndarray] = field(default=None, compare=False)

    @property
    def at_epoch_start(self) -> bool:
        return not (self.batch or self.position or self.unread or (self.seen is not None and self.seen.any()))


class PassSupersededError(DaliRelabelError, RuntimeError):
    """An iterator whose pass was ended by a newer ``iter()`` of the same loader."""


def superseded(current: "Pass") -> PassSupersededError:
    """The error an iterator raises when a newer ``iter()`` of its loader has ended its pass."""
    return PassSupersededError(
        f"this iterator's pass over epoch {current.epoch} was ended after {current.consumed} batches by a "
        "newer iter() of the same loader: a loader runs one pass at a time (one DALI pipeline); finish "
        "or drop an iterator before starting the next")


@dataclass
class Pass:
    """One pass (an ``iter()``) over a loader."""

    epoch: int
    first: int  # the epoch's batch number of the pass's first batch
    mixing: bool = True  # CutMix/Mixup switched on for this pass
    consumed: int = 0  # batches taken from the pipeline so far
    finished: bool = False
    superseded: bool = False  # a newer iter() of the loader ended it
    checkpoint: Optional[str] = None  # DALI's checkpoint of the pass's start (base64; shard loaders)
    iterator: object = None  # the DALI iterator the pass reads, where a loader keeps one per pass
    start: Start = field(default_factory=Start)  # where in the epoch the pass starts
    total: int = 0  # batches the pass yields
    seen: Optional[np.ndarray] = None  # rows yielded in the epoch so far (loaders that count them)
    left_out: set = field(default_factory=set)  # shards this pass does not read (damaged; shard loaders)


def pack_rows(mask: np.ndarray) -> str:
    """A bool mask over the rows as text (base64 of its bits), for a state."""
    return base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")


def unpack_rows(text: str, num_rows: int) -> np.ndarray:
    """The bool mask :func:`pack_rows` wrote."""
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=num_rows).astype(bool)


def merge_states(states: Sequence[dict]) -> dict:
    """The global data position of every rank's ``state_dict()`` (in any order), for a checkpoint
    that any number of ranks resumes from. Tree loaders' states are already global (every rank's is
    the same); shard loaders' ranks each know their own rows (``seen``), joined here, and their DALI
    checkpoints are kept by rank (``dali_checkpoints``) for a resume with the same shape.

    Refuses states of different epochs or (tree loaders) positions: in DDP every rank steps together."""
    states = list(states)
    if not states:
        raise ValueError("no states to merge")
    first = states[0]
    shared = ("epoch", "batch", "world_size", "batch_size")
    if first.get("seen") is None:  # a plan's position is global: every rank's is the same
        shared += ("position", "unread")
    for other in states[1:]:
        mismatch = [k for k in shared if k in first and other.get(k) != first[k]]
        if mismatch:
            raise ResumeError(f"the ranks' data states stand at different positions ({', '.join(mismatch)}: "
                              f"{first[mismatch[0]]!r} and {other[mismatch[0]]!r}): merge states saved at the same step")
    merged = dict(first, rank=None, dali_checkpoint=None)
    world = first.get("world_size") or len(states)
    checkpoints = [None] * world
    for state in states:
        for rank, checkpoint in _rank_checkpoints(state).items():
            if 0 <= rank < world:
                checkpoints[rank] = checkpoint
    merged["dali_checkpoints"] = checkpoints if any(checkpoints) else None
    if any(state.get("seen") is not None for state in states):
        rows = int(first.get("num_samples") or 0)
        mask = np.zeros(rows, bool)
        ranks = set()
        for state in states:
            if state.get("seen") is not None:
                mask |= unpack_rows(state["seen"], rows)
                ranks.update(state.get("seen_ranks") or ())
        merged.update(seen=pack_rows(mask), seen_ranks=sorted(ranks), position=int(mask.sum()))
    return merged


def _rank_checkpoints(state: dict) -> dict:
    """``{rank: DALI checkpoint}`` a state holds (its own, or a merged state's list)."""
    found = {}
    if state.get("dali_checkpoints"):
        found.update({rank: c for rank, c in enumerate(state["dali_checkpoints"]) if c})
    if state.get("dali_checkpoint") and state.get("rank") is not None:
        found[int(state["rank"])] = state["dali_checkpoint"]
    return found


def epoch_start_state(state: dict, epoch: int) -> dict:
    """``state`` moved to the start of ``epoch`` (what a run cut short saves at an epoch's end)."""
    return dict(state, epoch=int(epoch), batch=0, position=0, unread=[], dali_checkpoint=None,
                dali_checkpoints=None, seen=None, seen_ranks=None)


class LoaderState(abc.ABC):
    """The DataLoader-like position of a loader: the epoch and the :class:`Start` of the next pass.

    Args:
        batches_per_epoch: batches of a whole epoch on this rank (the same on every rank).
        start_epoch, resume_batch: where the first pass starts (``resume_batch`` batches of
            ``start_epoch`` already trained on, with this loader's shape; the epoch's end is the next
            epoch's start).

    A state (:meth:`state_dict`) holds the global position (see the module's docstring), the shape
    it was saved with (``world_size``, ``batch_size``, ``rank``) and the settings that must not
    change for a position inside an epoch to mean the same samples and targets (:meth:`_fingerprint`:
    the order's and the data's).

    Subclasses give :meth:`_fingerprint`, :attr:`samples_per_rank`, :meth:`epoch_rows`,
    :attr:`world_size` and :attr:`batch_size`; :meth:`_pass_batches`, :meth:`_start_after` and
    :meth:`_resume_start` turn positions into passes; they stop a running pass in :meth:`_end_pass`,
    and (with ``keeps_checkpoints``) read DALI's checkpoint of a running pass in
    :meth:`_pass_checkpoint`.
    """

    #: The position inside an epoch is (also) DALI's checkpoint of the rank's reader.
    keeps_checkpoints = False
    #: Crops a batch takes from each image (``DataConfig.crops_per_image`` of a training loader):
    #: ``batch_size`` and ``len(sampler)`` count crops, positions count images.
    crops_per_image = 1

    def __init__(self, batches_per_epoch: int, start_epoch: int = 0, resume_batch: int = 0):
        if not 0 <= resume_batch <= batches_per_epoch:
            raise ValueError(f"resume_batch {resume_batch} is outside the epoch's {batches_per_epoch} batches")
        self.batches_per_epoch = batches_per_epoch
        self._pass: Optional[Pass] = None
        if resume_batch == batches_per_epoch:
            self.epoch, self._start = start_epoch + 1, Start()
        else:
            self.epoch, self._start = start_epoch, self._start_at_batch(resume_batch)
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

    # What scripts read off a DataLoader: batches need no pinning or collating (DALI makes them on
    # their device), the pipeline persists from pass to pass, and the randomness is keyed by the
    # config's seed, not drawn from a torch generator.
    pin_memory = False
    collate_fn = None
    persistent_workers = True
    generator = None
    prefetch_factor = None

    @property
    def num_workers(self) -> int:
        """Worker processes running the batch source (``DataConfig.py_num_workers``; 0: the loader's
        own process). DALI's decoding threads are ``DataConfig.num_threads``."""
        config = getattr(self, "config", None)
        return int(config.py_num_workers) if config is not None else 0

    # -- what subclasses say ------------------------------------------------------------------------
    @abc.abstractmethod
    def _fingerprint(self) -> dict:
        """The settings a position inside an epoch is only valid with (the order's: seed, shuffle,
        the data set, repeats; the data's: store hash, image size, layout, targets, augmentation)."""

    @property
    @abc.abstractmethod
    def samples_per_rank(self) -> int:
        """Samples of an epoch on this rank (``len(loader.sampler)``)."""

    @abc.abstractmethod
    def epoch_rows(self, epoch: int) -> List[int]:
        """This rank's rows of ``epoch`` in the order a pass reads them (iterating ``loader.sampler``)."""

    def _shape(self) -> dict:
        """The shape a state is saved with: it may change on resume (elastic)."""
        return {"world_size": getattr(self, "world_size", 1), "batch_size": getattr(self, "batch_size", None),
                "rank": getattr(self, "rank", 0)}

    def _start_at_batch(self, batch: int) -> Start:
        """The start of the pass from batch ``batch`` of a whole epoch (this loader's shape)."""
        return Start(batch=batch)

    def _pass_batches(self, start: Start) -> int:
        """Batches of a pass from ``start``."""
        return self.batches_per_epoch - start.batch

    def _start_after(self, current: Pass) -> Start:
        """The global position after the batches the running pass ``current`` yielded (fewer than
        its total)."""
        return Start(batch=current.first + current.consumed)

    def _resume_start(self, state: dict, same_shape: bool) -> Start:
        """The start of a saved position inside an epoch (``same_shape``: saved with this loader's
        world size and batch size)."""
        if not same_shape:
            raise ResumeError(f"this loader cannot continue a position saved with another shape "
                              f"({_shape_text(state)}); resume with that shape, or {RESTART_HINT}")
        batch, checkpoint = int(state["batch"]), None
        if self.keeps_checkpoints:
            rank = self._shape()["rank"]
            checkpoint = _rank_checkpoints(state).get(rank)
            if not checkpoint:
                raise ResumeError(f"cannot resume at batch {batch} of epoch {state['epoch']}: the state has no "
                                  f"DALI checkpoint of rank {rank}'s position (only the loaders' own state_dict, "
                                  f"or merge_states of every rank's, has one); {RESTART_HINT}")
        return Start(batch=batch, checkpoint=checkpoint)

    def _state_extra(self, start: Start) -> dict:
        """What a subclass adds to a state of ``start``."""
        return {}

    def _end_pass(self) -> None:
        """Stop the running pass (if any) at the batch it reached."""
        self._pass = None

    def _pass_checkpoint(self, current: Pass) -> Optional[str]:
        """DALI's checkpoint (base64) of where the running pass ``current`` stands."""
        return None

    # -- the position -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches the next pass yields (fewer in an epoch resumed mid-way; padding-only batches of
        a small last shard count too)."""
        return self._pass_batches(self._start)

    @property
    def _first_batch(self) -> int:
        return self._start.batch

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (its order, crops and CutMix boxes). Setting the epoch a
        resumed position belongs to keeps that position."""
        if epoch != self.epoch:
            self.epoch, self._start = int(epoch), Start()

    def _still_running(self, current: Pass) -> bool:
        """Whether ``current`` is still the running pass (checked in the loader's own process). A
        pass a newer ``iter()`` ended raises :class:`PassSupersededError`, never ends silently; one
        stopped otherwise (the loader closed, a state loaded) gives ``False``."""
        self._check_process()
        if self._pass is current:
            return True
        if current.superseded:
            raise superseded(current)
        return False

    def _supersede_running_pass(self) -> None:
        """Mark the running pass as ended by a newer ``iter()``: its iterator then raises
        :class:`PassSupersededError` instead of ending silently."""
        if self._pass is not None and not self._pass.finished:
            self._pass.superseded = True

    def _next_pass(self, mixing: bool = True) -> Pass:
        """The pass an ``iter()`` starts (now the running one); the pass after it reads the next
        epoch from its start unless ``set_epoch`` or ``load_state_dict`` say otherwise."""
        self._check_process()
        self._supersede_running_pass()
        start = self._start
        current = Pass(self.epoch, start.batch, mixing, checkpoint=start.checkpoint, start=start,
                       total=self._pass_batches(start))
        self.epoch, self._start = current.epoch + 1, Start()
        self._pass = current
        return current

    def _position(self) -> Tuple[int, Start]:
        """``(epoch, start)`` of the data position now (the running pass's, else the next pass's)."""
        current = self._pass
        if current is None or current.finished:
            return self.epoch, self._start
        if current.consumed >= current.total:
            return current.epoch + 1, Start()
        if current.consumed == 0:
            return current.epoch, current.start
        start = self._start_after(current)
        if self.keeps_checkpoints:
            checkpoint = self._pass_checkpoint(current)
            start = Start(start.batch, start.position, start.unread, checkpoint, start.seen)
        return current.epoch, start

    def state_dict(self) -> dict:
        """The data position: the epoch, the batch the next batch is (this shape's count), the global
        position (``position``/``unread``, or ``seen`` rows), DALI's checkpoint where the loader keeps
        one, the shape (``world_size``, ``batch_size``, ``rank``) and the settings that define the
        epoch's order and data (:meth:`_fingerprint`)."""
        epoch, start = self._position()
        state = {"epoch": epoch, "batch": start.batch, "position": start.position, "unread": list(start.unread),
                 "dali_checkpoint": start.checkpoint, **self._shape(), **self._state_extra(start)}
        state.update(self._fingerprint())
        return state

    def load_state_dict(self, state: dict, restart_epoch: bool = False) -> None:
        """Continue from a :meth:`state_dict` (or :func:`merge_states`) position; a running pass is
        stopped.

        With the saved world size and batch size the next pass is exactly the rest of the
        uninterrupted epoch; with others it reads the rest of the epoch's global order, each sample
        once (see the loader's docs for what a shard loader guarantees). At an epoch boundary any
        setting may change. Inside an epoch, a state made with other order or data settings (seed,
        shuffle, data set, repeats, store content, image size, layout, targets, augmentation) is
        refused with :class:`ResumeError` naming them; ``restart_epoch=True`` starts the saved epoch
        again from its first batch instead (nothing is compared)."""
        epoch = int(state["epoch"])
        saved = Start(int(state.get("batch", 0)), int(state.get("position") or 0), tuple(state.get("unread") or ()))
        if restart_epoch or saved.at_epoch_start:
            self._end_pass()
            self.epoch, self._start = epoch, Start()
            return
        differ = _differences(state, self._fingerprint())
        if differ:
            detail = ", ".join(differ)
            raise ResumeError(f"cannot continue epoch {epoch} at batch {saved.batch} with other data settings "
                              f"({detail}): the rest of the epoch would be other samples or targets; resume "
                              f"with the saved settings, or {RESTART_HINT}")
        shape = self._shape()
        same_shape = all(state.get(k, shape[k]) == shape[k] for k in ("world_size", "batch_size"))
        if same_shape and saved.batch >= self.batches_per_epoch:  # saved after the epoch's last batch
            self._end_pass()
            self.epoch, self._start = epoch + 1, Start()
            return
        start = self._resume_start(state, same_shape)
        self._end_pass()
        if self._pass_batches(start) <= 0:  # nothing of the epoch left for this shape
            self.epoch, self._start = epoch + 1, Start()
        else:
            self.epoch, self._start = epoch, start


class PlannedState(LoaderState):
    """A :class:`LoaderState` whose epochs follow an :class:`~dali_relabel.plan.EpochPlan` (the tree
    loaders): the global position is the plan's (``position``/``unread``), computed by every rank
    alone, and a pass from it reads the rest of the epoch's global order dealt to this loader's ranks
    (:meth:`~dali_relabel.plan.EpochPlan.rows` with ``start``), whatever shape saved it.

    Args:
        plan: this rank's plan.
        start_epoch, resume_batch: as :class:`LoaderState`.
    """

    def __init__(self, plan, start_epoch: int = 0, resume_batch: int = 0):
        self.plan = plan
        super().__init__(plan.num_batches, start_epoch, resume_batch)

    @property
    def batch_size(self) -> int:
        """Samples of a batch: the plan's images per batch times :attr:`crops_per_image`."""
        return self.plan.batch_size * self.crops_per_image

    @property
    def world_size(self) -> int:
        return getattr(self.plan, "world_size", 1)

    @property
    def rank(self) -> int:
        return getattr(self.plan, "rank", 0)

    @property
    def samples_per_rank(self) -> int:
        return self.plan.samples_per_rank * self.crops_per_image

    def epoch_rows(self, epoch: int) -> List[int]:
        """This rank's rows of ``epoch`` in pass order, each image's row once per crop."""
        rows, valid = self.plan.rows(epoch)
        return np.repeat(rows[valid], self.crops_per_image).tolist()

    def _fingerprint(self) -> dict:
        """The order's settings (seed, shuffle, data set size, repeats) and :meth:`_data_fingerprint`."""
        plan = self.plan
        order = {key: getattr(plan, key) for key in ("num_samples", "seed", "shuffle", "repeats") if hasattr(plan, key)}
        return {**order, **self._data_fingerprint()}

    def _data_fingerprint(self) -> dict:
        """What defines the samples and targets besides the order (subclasses: the store's content,
        the image size, the augmentation...)."""
        return {}

    # -- the global position: the plan's order ------------------------------------------------------
    def _start_at_batch(self, batch: int) -> Start:
        if batch == 0 or not hasattr(self.plan, "position_after"):  # a plan with no global order
            return Start(batch=batch)
        position, unread = self.plan.position_after(batch)
        return Start(batch, position, unread)

    def _pass_batches(self, start: Start) -> int:
        if not hasattr(self.plan, "batches"):  # a plan with no global order: batches of the epoch
            return self.plan.num_batches - start.batch
        return self.plan.batches(start.position, start.unread)

    def _start_after(self, current: Pass) -> Start:
        if not hasattr(self.plan, "position_after"):
            return Start(batch=current.first + current.consumed)
        position, unread = self.plan.position_after(current.consumed, current.start.position, current.start.unread)
        return Start(current.first + current.consumed, position, unread)

    def _resume_start(self, state: dict, same_shape: bool) -> Start:
        """The saved global position (states saved before it existed: from their batch and shape);
        numbered as the saved batch with the same shape, else as the batches of this shape so far."""
        batch = int(state["batch"])
        if state.get("position") is None:  # an older state: every rank stood at ``batch``
            try:
                saved = type(self.plan)(self.plan.num_samples, int(state["batch_size"]), 0, int(state["world_size"]),
                                  seed=self.plan.seed, shuffle=self.plan.shuffle,
                                  last_batch=state.get("last_batch", self.plan.last_batch), repeats=self.plan.repeats)
                position, unread = saved.position_after(batch)
            except (KeyError, ValueError) as error:
                raise ResumeError(f"the state of batch {batch} of epoch {state['epoch']} names no position this "
                                  f"loader can continue ({error})") from None
        else:
            position, unread = int(state["position"]), tuple(int(u) for u in state.get("unread") or ())
        if not same_shape:
            batch = position // (self.plan.batch_size * self.plan.world_size)
        try:
            self.plan.batches(position, unread)
            self.plan._check_start(position, unread)
        except ValueError as error:
            raise ResumeError(f"epoch {state['epoch']}: {error}") from None
        return Start(batch, position, unread)


def _shape_text(state: dict) -> str:
    return f"world_size {state.get('world_size')}, batch_size {state.get('batch_size')}"


def _differences(saved: dict, mine: dict, prefix: str = "") -> List[str]:
    """``"name: saved a, now b"`` for every setting of ``mine`` that ``saved`` holds with another
    value (settings a state does not hold are not compared); nested settings as ``data.name``."""
    found = []
    for key, value in mine.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            found += _differences(saved[key], value, f"{prefix}{key}.")
        elif _plain(saved[key]) != _plain(value):
            found.append(f"{prefix}{key}: saved {saved[key]!r}, now {value!r}")
    return found


def _plain(value):
    """Tuples and lists compare alike (a state that went through JSON or a checkpoint)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
