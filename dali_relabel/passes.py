"""Passes over one DALI pipeline fed by a :class:`~dali_relabel.sources.BatchSource`.

:class:`PipelineBatches` runs the passes of the tree loaders on a
:class:`~dali_relabel.loader_state.LoaderState` (the position, ``len()``, ``set_epoch``,
``state_dict``/``load_state_dict``): every ``iter()`` is a new pass over the epoch ``set_epoch`` chose
(an unfinished pass is stopped when the next one starts), padding and stand-ins removed, a batch that
fails to decode explained by naming the file (or skipped), and dead or stuck source workers turned into
errors (:mod:`dali_relabel.watchdog`). The training and validation loaders, and the teacher pass of
``dali-relabel generate``, are built on it.
"""
from __future__ import annotations

import gc
import os
import threading
import weakref
from typing import Callable, List, Sequence

from .bad_images import BadImageError, decode_problem
from .errors import DaliRelabelError
from .loader_state import Pass, PlannedState
from .lookahead import Stream, locate
from .processes import die_with_parent
from .sources import FOREVER, SKIPPED, VALID, BatchSource, EpochControl
from .watchdog import LoaderWorkerError, PipelineGuard, shutdown_pipeline, source_workers


_STARTING_WORKERS = {"parent": None}


def _arm_forked_worker() -> None:
    """At fork, in the child: a worker forked by :func:`start_workers` dies with its parent."""
    parent = _STARTING_WORKERS["parent"]
    if parent is not None:
        _STARTING_WORKERS["parent"] = None
        die_with_parent(parent)


os.register_at_fork(after_in_child=_arm_forked_worker)


def start_workers(pipe) -> None:
    """Start a pipeline's source workers without handing them this process's garbage, and so that
    they die with this process (forked ones from their first instruction, spawned ones when they
    unpickle the source).

    Forked workers inherit every object of this process. Garbage in reference cycles (for example
    an earlier loader's DALI pipeline) would be collected inside a worker, and a DALI pipeline torn
    down there crashes the worker. So collect it here first, and freeze what is left, so the
    workers' collector never looks at inherited objects.
    """
    if not pipe.py_num_workers:
        return  # the source runs in this process (prefetch.PrefetchingSource): nothing to start
    gc.collect()
    gc.freeze()
    _STARTING_WORKERS["parent"] = os.getpid()
    try:
        pipe.start_py_workers()
    finally:
        _STARTING_WORKERS["parent"] = None
        gc.unfreeze()


class _PipelineParts:
    """A loader's running pipeline, its DALI iterator, its :class:`EpochControl` file and its
    :class:`PipelineGuard` (with the guard's thread). The loader and its finalizer hold it; it refers
    to nothing that refers to the loader, so a dropped loader is collected and its finalizer releases
    these: the source workers stop, the guard's thread ends, the control file goes."""

    def __init__(self):
        self.pipeline = self.iterator = self.control = self.guard = None
        self.owner = os.getpid()
        self.owner_thread = threading.get_ident()

    def release(self) -> None:
        """Stop the pipeline (unless a call is still blocked in it) and its source workers, end the
        guard's thread, remove the control file; in the process that built them only (a forked
        child inherits the finalizer, not the pipeline). Called by the garbage collector on another
        thread (a helper thread or DALI's, which the pipeline's shutdown may wait for), the work
        moves to a thread of its own."""
        if os.getpid() != self.owner:
            return
        pipeline, guard, control = self.pipeline, self.guard, self.control
        self.pipeline = self.iterator = self.control = self.guard = None
        if threading.get_ident() != self.owner_thread:
            threading.Thread(target=self._release, args=(pipeline, guard, control), name="dali-relabel-release",
                             daemon=True).start()
        else:
            self._release(pipeline, guard, control)

    @staticmethod
    def _release(pipeline, guard, control) -> None:
        if pipeline is not None:
            shutdown_pipeline(pipeline, blocked=guard is not None and guard.broken)
        if control is not None:
            control.close()
        if guard is not None:
            guard.close()


class PipelineBatches(PlannedState):
    """Passes over one DALI pipeline fed by a :class:`BatchSource`: dicts of torch tensors named by
    ``output_map``, padding and stand-ins removed, decoder failures re-raised naming the file.

    Args:
        plan: the rank's row plan.
        make_source: ``(control, bad_rows) -> BatchSource``.
        make_pipeline: ``source -> Pipeline`` (not yet built).
        output_map: names of the pipeline's outputs.
        start_epoch, resume_batch: where the first pass starts.
        skip_bad_images: replace undecodable images (found when a batch fails) instead of raising
            :class:`BadImageError`; the pipeline is rebuilt at the failed batch, so nothing else of
            the epoch changes.
        lookahead: batches after a failed one that may have caused its error (DALI prefetches).
        timeout: seconds without a batch before the source workers count as stuck; a dead or
            stopped worker is reported at once (:mod:`dali_relabel.watchdog`). After such an error
            the next pass starts on a new pipeline.

    Every ``iter()`` starts a new pass over the next epoch (``set_epoch`` chooses it). The pipeline
    does not stop between passes: when a pass has taken its batches, DALI goes on making the next
    epoch's first ones (:mod:`dali_relabel.lookahead`), which the next pass takes if it starts there
    with the same mixing switch. Otherwise (``set_epoch`` or ``load_state_dict`` chose another
    position, ``mixup_enabled`` changed with CutMix on, or the last pass was left unfinished) what was made ahead
    is drained unseen, about ``2 * prefetch_queue_depth`` batches, and the pass starts afresh.
    """

    def __init__(self, plan, make_source: Callable[[EpochControl, Sequence[int]], BatchSource],
                 make_pipeline: Callable[[BatchSource], object], output_map: List[str],
                 start_epoch: int = 0, resume_batch: int = 0, skip_bad_images: bool = False,
                 lookahead: int = 4, timeout: float = 300.0):
        super().__init__(plan, start_epoch, resume_batch)
        self._make_source = make_source
        self._make_pipeline = make_pipeline
        self._output_map = output_map
        self.skip_bad_images = skip_bad_images
        self._lookahead = lookahead
        self.timeout = timeout
        self.skipped_images = 0
        self.bad_rows: List[int] = []
        # What the pipeline holds, apart from the loader: dropping the loader releases it.
        self._parts = _PipelineParts()
        self._finalizer = weakref.finalize(self, self._parts.release)
        self._start_pipeline()

    # -- the pipeline ------------------------------------------------------------------------------
    @property
    def pipeline(self):
        """The running DALI pipeline (``None`` after :meth:`close`)."""
        return self._parts.pipeline

    @property
    def control(self) -> EpochControl:
        return self._parts.control

    @property
    def _guard(self) -> PipelineGuard:
        return self._parts.guard

    @property
    def _iterator(self):
        return self._parts.iterator

    def _start_pipeline(self, capacity: int = 0) -> None:
        """A new pipeline (and source workers); each pass says what it reads (:meth:`_begin_pass`).
        ``capacity``: unread positions a pass start may carry (at least the ranks')."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        parts = self._parts
        parts.control = EpochControl(max(64, self.world_size, capacity))
        self.source = self._make_source(parts.control, list(self.bad_rows))
        parts.pipeline = self._make_pipeline(self.source)
        start_workers(parts.pipeline)
        parts.pipeline.build()
        parts.iterator = DALIGenericIterator([parts.pipeline], self._output_map, size=-1, auto_reset=False,
                                             prepare_first_batch=False)
        parts.guard = PipelineGuard(lambda: source_workers(parts.pipeline), timeout=self.timeout,
                                    pipeline=lambda: parts.pipeline)
        self._dali_epoch = 0  # the pipeline's epoch index of the next (or running) stream
        self._needs_reset = False
        self._stream = None  # what the pipeline's DALI epoch reads (None: no stream open)

    def close(self) -> None:
        """Stop the pipeline and its source's worker processes now (a later ``iter()`` starts a new
        pipeline at the position). A loader dropped without ``close()`` is closed when collected."""
        self._pass = None
        self._drop_pipeline()

    def _drop_pipeline(self) -> None:
        self._stream = None
        self._parts.release()

    # -- passes ------------------------------------------------------------------------------------
    def __iter__(self):
        return self._batches()

    def _mixing_enabled(self) -> bool:
        """Whether the next pass mixes (subclasses with CutMix/Mixup say)."""
        return True

    def _begin_pass(self) -> Pass:
        self._check_process()
        self._supersede_running_pass()
        self._end_pass()
        if self.pipeline is None or self._guard.broken or len(self._start.unread) > self.control.capacity:
            self._restart_pipeline()  # closed, the last pass lost a worker, or the control is too small
        current = self._next_pass(self._mixing_enabled())
        stream = self._stream
        if (stream is not None and current.start.at_epoch_start
                and stream.continues(current.epoch, current.first, current.mixing, self._source_mixes())):
            return current  # DALI has been making this pass's first batches already
        self._drain_stream()
        self._open_stream(current, current.first)
        return current

    def _source_mixes(self) -> bool:
        """Whether the source's batches depend on the mixing switch (its CutMix boxes)."""
        return getattr(self.source, "cutmix", None) is not None

    def _open_stream(self, current: Pass, first: int) -> None:
        """Start the pipeline's next DALI epoch at batch ``first`` of the pass ``current`` (from its
        start), running on through the following epochs, each from its start."""
        self.control.begin(self._dali_epoch, current.epoch, first, FOREVER, current.mixing, current.start)
        if self._needs_reset:  # DALI asks the source for the new epoch's batches at once
            self._guard.call(self._iterator.reset)
            self._needs_reset = False
        self._stream = Stream(current.epoch, first, current.mixing, self.plan.num_batches,
                              end=current.first + current.total, resumed=not current.start.at_epoch_start)

    def _drain_stream(self) -> None:
        """Stop the open stream where the loader stands in it and drain what DALI made ahead."""
        stream, self._stream = self._stream, None
        if stream is None or self.pipeline is None or self._guard.broken:
            return
        self.control.stop(self._dali_epoch, stream.position)
        try:
            while True:
                self._guard.call(self._iterator.__next__)
        except StopIteration:
            self._dali_epoch += 1
            self._needs_reset = True
        except RuntimeError:  # an error in a batch nobody will see: start afresh
            self._restart_pipeline()

    def _end_pass(self) -> None:
        """Stop the running pass (if any); what DALI made ahead is kept until the next pass starts
        (:meth:`_begin_pass` keeps it, or drains it if that pass starts elsewhere)."""
        self._pass = None

    def _restart_pipeline(self) -> None:
        capacity = max(len(self._start.unread), getattr(getattr(self, "control", None), "capacity", 0))
        self._drop_pipeline()
        self._start_pipeline(capacity)

    def _batches(self):
        current = self._begin_pass()
        while True:
            if not self._still_running(current):
                return
            try:
                # the iterator's method: a call left blocked (a dead worker) keeps no loader alive
                outputs = self._guard.call(self._iterator.__next__)
            except StopIteration:  # only a stream stopped under a running pass ends: a bug
                self._stream, self._needs_reset = None, True
                self._dali_epoch += 1
                raise DaliRelabelError(f"the pipeline's stream ended after {current.consumed} batches of the "
                                       f"pass over epoch {current.epoch}") from None
            except LoaderWorkerError:
                raise  # the position stays where it was: the next pass can resume it
            except RuntimeError as error:
                self._recover(current, error)
                continue
            current.consumed += 1
            self._stream.taken += 1
            if current.consumed >= current.total:
                current.finished = True  # the pass has its batches; DALI makes the next pass's
                self._pass = None
            self.skipped_images += int((outputs[0]["valid"].reshape(-1).cpu() == SKIPPED).sum())  # images
            batch = self._transform(outputs[0], current)
            keep = batch["valid"].reshape(-1).cpu() == VALID
            if bool(keep.all()):
                yield batch
            elif bool(keep.any()):
                index = keep.nonzero().reshape(-1)
                yield {name: value[index.to(value.device)] for name, value in batch.items()}

    def _transform(self, batch: dict, current: Pass) -> dict:
        """Batch-level work before padding is removed (CutMix pairs need the full batch): the
        training loader flattens several crops per image here, then mixes."""
        return batch

    def _recover(self, current: Pass, error: RuntimeError) -> None:
        """A batch failed: name the bad file, or (``skip_bad_images``) leave it out and go on."""
        failed = current.first + current.consumed
        bad = self._find_bad_rows(current, failed)
        if not bad:
            raise error
        if not self.skip_bad_images:
            row, problem = bad[0]
            raise BadImageError(f"{self.source.path(row)}: {problem}") from error
        self.bad_rows += [row for row, _ in bad if row not in self.bad_rows]
        self._restart_pipeline()  # the same pass from the failed batch on
        self._open_stream(current, failed)

    def _find_bad_rows(self, current: Pass, batch: int):
        """``[(row, problem)]`` of the undecodable images in ``batch`` (or the next few, which DALI
        may have been decoding ahead, into the next epoch's) of the pass's stream."""
        end = current.first + current.total
        start = None if current.start.at_epoch_start else (current.start.batch, current.start.position,
                                                              current.start.unread)
        for position in range(batch, batch + 1 + self._lookahead):
            if position < end:
                rows, _ = self.source.batch_rows(current.epoch, position, start)
            else:  # the following epochs, read whole
                rows, _ = self.source.batch_rows(*locate(current.epoch, position, self.plan.num_batches, end))
            found = []
            for row in dict.fromkeys(int(r) for r in rows):
                problem = decode_problem(self.source.path(row))
                if problem:
                    found.append((row, problem))
            if found:
                return found
        return []
