"""Drop-in iterators: ``for images, targets in ReLabelLoader(...)`` in an ordinary PyTorch loop.

:class:`ReLabelLoader` builds the training graph (``pipelines/graphs.py``) over an image tree and its
label store and yields ``(images, soft_targets)`` (optionally hard labels too) on the pipeline's
device; :class:`ValidationLoader` yields ``(images, labels)``. Both behave like a
``torch.utils.data.DataLoader`` where training scripts rely on it: ``len()``, every ``iter()`` starts a
new pass, ``set_epoch``, ``state_dict``/``load_state_dict``. They shard by **global** rank (from
``torch.distributed`` or the ``torchrun`` environment) and never yield padding samples.

:class:`PipelineBatches`, their base, drives one DALI pipeline fed by a
:class:`~dali_relabel.sources.BatchSource` pass after pass.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig
from .distributed import rank_and_world
from .imagefolder import list_images
from .mixing import CutMixSpec, apply_cutmix, apply_mixup, mixup_weights
from .paths import PathTable
from .plan import EpochPlan
from .sources import SKIPPED, VALID, BadImageError, BatchSource, EpochControl, check_encoded_image
from .store import LabelStore, StoreError
from .tree_check import check_store_matches_images
from .watchdog import LoaderWorkerError, PipelineGuard, shutdown_pipeline, source_workers


def resolve_device(device) -> str:
    """``"gpu"`` or ``"cpu"`` for what PyTorch accepts as a device (``"cuda"``, ``"cuda:1"``,
    ``torch.device``, ``"cpu"``; also ``"gpu"``); ``None``/``"auto"`` picks the GPU when torch sees one."""
    if device is None or device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device == "gpu" else torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was requested but torch sees no CUDA GPU")
        return "gpu"
    if kind == "cpu":
        return "cpu"
    raise ValueError(f"device must be a CPU or CUDA device (or 'auto'), got {device!r}")


def device_index(device, device_id: Optional[int] = None) -> Optional[int]:
    """The CUDA device index for ``device`` (``None`` on the CPU): the index in ``"cuda:1"`` or a
    ``torch.device``, else ``device_id``, else torch's current device."""
    if resolve_device(device) != "gpu":
        return None
    if device not in (None, "auto", "gpu") and torch.device(device).index is not None:
        return torch.device(device).index
    return torch.cuda.current_device() if device_id is None else int(device_id)


def decode_problem(path: str) -> Optional[str]:
    """Why DALI's CPU decoder cannot read or decode ``path`` (run alone), or ``None`` if it can."""
    from nvidia.dali import fn, pipeline_def

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    try:
        check_encoded_image(data, path)
    except BadImageError as error:
        return str(error).rsplit(": ", 1)[-1]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode_one():
        jpeg = fn.external_source(source=lambda: [data], batch=True)
        return fn.peek_image_shape(jpeg), fn.decoders.image(jpeg, device="cpu")

    try:
        pipe = decode_one()
        pipe.build()
        pipe.run()
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = [line for line in lines if "failure" in line or "Error" in line or "error" in line]
        return "cannot be decoded (DALI: " + (detail[-1] if detail else lines[-1])[:200] + ")"
    return None


def worker_start_method(requested: str) -> str:
    """The start method for DALI's source workers: ``requested``, but ``"spawn"`` instead of
    ``"fork"`` once this process has initialised the CUDA driver (forked workers would break).

    Asks DALI's own check: ``torch.cuda.is_available()`` initialises the driver without making
    ``torch.cuda.is_initialized()`` true."""
    from nvidia.dali.backend import IsDriverInitialized

    if requested == "fork" and IsDriverInitialized():
        return "spawn"
    return requested


def start_workers(pipe) -> None:
    """Start a pipeline's source workers without handing them this process's garbage.

    Forked workers inherit every object of this process. Garbage in reference cycles (for example
    an earlier loader's DALI pipeline) would be collected inside a worker, and a DALI pipeline torn
    down there crashes the worker. So collect it here first, and freeze what is left, so the
    workers' collector never looks at inherited objects.
    """
    gc.collect()
    gc.freeze()
    try:
        pipe.start_py_workers()
    finally:
        gc.unfreeze()


@dataclass
class _Pass:
    """One pass (an ``iter()``) over the loader."""

    epoch: int
    first: int  # the epoch's batch the pass starts at
    mixing: bool = True  # CutMix/Mixup switched on for this pass
    consumed: int = 0  # pipeline batches taken so far
    finished: bool = False


class PipelineBatches:
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

    Every ``iter()`` starts a new pass over the next epoch (``set_epoch`` chooses it); a pass left
    unfinished is stopped when the next one starts, which costs decoding the batches DALI had already
    prefetched (about ``2 * prefetch_queue_depth``).
    """

    def __init__(self, plan, make_source: Callable[[EpochControl, Sequence[int]], BatchSource],
                 make_pipeline: Callable[[BatchSource], object], output_map: List[str],
                 start_epoch: int = 0, resume_batch: int = 0, skip_bad_images: bool = False,
                 lookahead: int = 4, timeout: float = 300.0):
        if not 0 <= resume_batch <= plan.num_batches:
            raise ValueError(f"resume_batch {resume_batch} is outside the epoch's {plan.num_batches} batches")
        self.plan = plan
        self._make_source = make_source
        self._make_pipeline = make_pipeline
        self._output_map = output_map
        self.skip_bad_images = skip_bad_images
        self._lookahead = lookahead
        self.timeout = timeout
        self.epoch, self._first_batch = self._normalise(start_epoch, resume_batch)
        self.skipped_images = 0
        self.bad_rows: List[int] = []
        self._pass: Optional[_Pass] = None
        self._iterator = None
        self._start_pipeline(self.epoch, self._first_batch)

    # -- the pipeline ------------------------------------------------------------------------------
    def _start_pipeline(self, epoch: int, first_batch: int) -> None:
        """A new pipeline (and source workers) whose first pass reads ``epoch`` from ``first_batch``."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.control = EpochControl()
        self.control.begin(0, epoch, first_batch, self.plan.num_batches)
        self.source = self._make_source(self.control, list(self.bad_rows))
        self.pipeline = self._make_pipeline(self.source)
        start_workers(self.pipeline)
        self.pipeline.build()
        self._iterator = DALIGenericIterator([self.pipeline], self._output_map, size=-1, auto_reset=False,
                                             prepare_first_batch=False)
        self._guard = PipelineGuard(lambda: source_workers(self.pipeline), timeout=self.timeout)
        self._dali_epoch = 0  # the pipeline's epoch index of the next (or running) pass
        self._needs_reset = False

    def close(self) -> None:
        """Stop the pipeline and its source's worker processes now."""
        self._pass = None
        self._drop_pipeline()

    def _drop_pipeline(self) -> None:
        self._iterator = None
        if getattr(self, "pipeline", None) is not None:
            shutdown_pipeline(self.pipeline, blocked=self._guard.broken)
        self.pipeline = None
        if getattr(self, "control", None) is not None:
            self.control.close()
        if getattr(self, "_guard", None) is not None:
            self._guard.close()

    # -- DataLoader-like state ----------------------------------------------------------------------
    def _normalise(self, epoch: int, batch: int):
        """``batch == num_batches`` is the next epoch's start."""
        return (epoch + 1, 0) if batch >= self.plan.num_batches else (epoch, batch)

    def __len__(self) -> int:
        """Batches the next pass yields (fewer in an epoch resumed mid-way; padding-only batches of
        a small last shard count too)."""
        return self.plan.num_batches - self._first_batch

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (its permutation, crops and CutMix boxes). Setting the epoch
        a resumed position belongs to keeps that position."""
        if epoch != self.epoch:
            self.epoch, self._first_batch = int(epoch), 0

    def state_dict(self) -> dict:
        """Where the data order stands: the epoch and the batches of it already yielded, plus what
        must not change for that position to mean the same samples."""
        if self._pass is not None and not self._pass.finished:
            epoch, batch = self._normalise(self._pass.epoch, self._pass.first + self._pass.consumed)
        else:
            epoch, batch = self.epoch, self._first_batch
        return {"epoch": epoch, "batch": batch, **self._fingerprint()}

    def _fingerprint(self) -> dict:
        plan = self.plan
        keys = ("batch_size", "num_samples", "world_size", "rank", "seed", "shuffle", "last_batch")
        return {key: getattr(plan, key) for key in keys if hasattr(plan, key)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s position; refuses a state made with other settings
        (another batch size or world size would silently skip or repeat samples)."""
        mine = self._fingerprint()
        differ = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"cannot resume the data position with other settings ({detail}); resume "
                             "with the saved settings or start the epoch again")
        self._end_pass()
        self.epoch, self._first_batch = self._normalise(int(state["epoch"]), int(state["batch"]))

    # -- passes ------------------------------------------------------------------------------------
    def __iter__(self):
        return self._batches()

    def _mixing_enabled(self) -> bool:
        """Whether the next pass mixes (subclasses with CutMix/Mixup say)."""
        return True

    def _next_outputs(self):
        return next(self._iterator)

    def _begin_pass(self) -> _Pass:
        self._end_pass()
        if self._guard.broken:  # the last pass lost a worker: start on a new pipeline
            self._restart_pipeline(self.epoch, self._first_batch)
        current = _Pass(self.epoch, self._first_batch, self._mixing_enabled())
        self.control.begin(self._dali_epoch, current.epoch, current.first, self.plan.num_batches,
                           current.mixing)
        if self._needs_reset:
            self._guard.call(self._iterator.reset)
            self._needs_reset = False
        self.epoch, self._first_batch = current.epoch + 1, 0  # the next pass, unless set otherwise
        self._pass = current
        return current

    def _end_pass(self) -> None:
        """Stop the running pass (if any) at the batch it reached and drain what DALI prefetched."""
        current, self._pass = self._pass, None
        if current is None or current.finished or self._guard.broken:
            return
        self.control.stop(self._dali_epoch, current.first + current.consumed)
        try:
            while True:
                self._guard.call(self._next_outputs)
        except StopIteration:
            self._dali_epoch += 1
            self._needs_reset = True
        except RuntimeError:  # an error in a batch nobody will see: start afresh
            self._restart_pipeline(self.epoch, self._first_batch)

    def _restart_pipeline(self, epoch: int, first_batch: int) -> None:
        self._drop_pipeline()
        self._start_pipeline(epoch, first_batch)

    def _batches(self):
        current = self._begin_pass()
        while True:
            if self._pass is not current:
                return  # a newer pass took over
            try:
                outputs = self._guard.call(self._next_outputs)
            except StopIteration:
                current.finished = True
                self._pass = None
                self._dali_epoch += 1
                self._needs_reset = True
                return
            except LoaderWorkerError:
                raise  # the position stays where it was: the next pass can resume it
            except RuntimeError as error:
                self._recover(current, error)
                continue
            current.consumed += 1
            batch = self._transform(outputs[0], current)
            status = batch["valid"].reshape(-1).cpu()
            self.skipped_images += int((status == SKIPPED).sum())
            keep = status == VALID
            if bool(keep.all()):
                yield batch
            elif bool(keep.any()):
                index = keep.nonzero().reshape(-1)
                yield {name: value[index.to(value.device)] for name, value in batch.items()}

    def _transform(self, batch: dict, current: _Pass) -> dict:
        """Batch-level work before padding is removed (CutMix pairs need the full batch)."""
        return batch

    def _recover(self, current: _Pass, error: RuntimeError) -> None:
        """A batch failed: name the bad file, or (``skip_bad_images``) leave it out and go on."""
        failed = current.first + current.consumed
        bad = self._find_bad_rows(current.epoch, failed)
        if not bad:
            raise error
        if not self.skip_bad_images:
            row, problem = bad[0]
            raise BadImageError(f"{self.source.path(row)}: {problem}") from error
        self.bad_rows += [row for row, _ in bad if row not in self.bad_rows]
        self._restart_pipeline(current.epoch, failed)  # the same epoch from the failed batch on
        self.control.begin(0, current.epoch, failed, self.plan.num_batches, current.mixing)
        current.first, current.consumed = failed, 0

    def _find_bad_rows(self, epoch: int, batch: int):
        """``[(row, problem)]`` of the undecodable images in ``batch`` (or the next few)."""
        last = min(self.plan.num_batches, batch + 1 + self._lookahead)
        for index in range(batch, last):
            rows, _ = self.source.batch_rows(epoch, index)
            found = []
            for row in dict.fromkeys(int(r) for r in rows):
                problem = decode_problem(self.source.path(row))
                if problem:
                    found.append((row, problem))
            if found:
                return found
        return []


def _resolve_rank(rank: Optional[int], world_size: Optional[int]):
    default_rank, default_world = rank_and_world()
    return (default_rank if rank is None else rank), (default_world if world_size is None else world_size)


def _pipeline_kwargs(config: DataConfig, batch_size: int, device_id: Optional[int]) -> dict:
    """Execution settings every graph is built with."""
    return dict(batch_size=batch_size, num_threads=config.num_threads, device_id=device_id,
                seed=config.seed, py_num_workers=config.py_num_workers,
                py_start_method=worker_start_method(config.py_start_method),
                prefetch_queue_depth=config.prefetch_queue_depth, exec_dynamic=True)


def _as_torch_images(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """DALI's images as PyTorch wants them: ``[B, 3, H, W]``, in ``channels_last`` memory format when
    asked (a view of DALI's HWC output, no copy), and bfloat16 when asked (DALI makes float32)."""
    if config.channels_last:
        images = images.permute(0, 3, 1, 2)
    if config.output_dtype == "bfloat16":
        images = images.to(torch.bfloat16)
    return images


def mix_batch(batch: dict, config: DataConfig, num_classes: int, epoch: int, batch_index: int,
              mixing: bool = True) -> dict:
    """CutMix (from the batch's ``mix_box``, and ``pasted`` in ``"localized"`` mode), Mixup for the
    pairs CutMix left alone, then label smoothing: the batch-level work of the training loaders,
    before padding is removed (pairs need the full batch). ``batch_index`` and ``epoch`` key Mixup's
    weights; ``mixing`` off (timm's ``mixup_enabled``) leaves Mixup out."""
    if "mix_box" in batch:
        images, targets, _ = apply_cutmix(batch["images"], batch["mix_box"], batch["targets"],
                                          batch.get("pasted"), channels_last=config.channels_last)
        batch = dict(batch, images=images, targets=targets)
        batch.pop("pasted", None)
    stopped = config.cutmix_stop_epoch is not None and epoch >= config.cutmix_stop_epoch
    if config.mixup_alpha > 0 and mixing and not stopped:
        size = batch["images"].shape[0]
        lam = mixup_weights(size, config.mixup_alpha, config.seed, epoch, batch_index, config.mixup_probability,
                            per_batch=config.mix_granularity == "batch")
        untouched = (batch["mix_box"].reshape(size, 4) == 0).all(1) if "mix_box" in batch \
            else torch.ones(size, dtype=torch.bool)
        images, targets = apply_mixup(batch["images"], batch["targets"], lam, untouched)
        batch = dict(batch, images=images, targets=targets)
    if config.label_smoothing:
        smoothing = config.label_smoothing
        batch = dict(batch, targets=batch["targets"] * (1 - smoothing) + smoothing / num_classes)
    return batch


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


class LoaderSampler:
    """What ``loader.sampler`` is to a training script: ``set_epoch`` (as on a ``DistributedSampler``;
    it sets the loader's epoch), ``len()`` (this rank's samples per epoch) and iteration over this
    rank's rows of the coming epoch."""

    def __init__(self, loader: "PipelineBatches"):
        import weakref

        self._loader = weakref.ref(loader)  # no cycle: dropping the loader stops its workers

    def set_epoch(self, epoch: int) -> None:
        self._loader().set_epoch(epoch)

    def __len__(self) -> int:
        return self._loader().plan.samples_per_rank

    def __iter__(self):
        loader = self._loader()
        rows, valid = loader.plan.rows(loader.epoch)
        return iter(rows[valid].tolist())


class ReLabelLoader(PipelineBatches):
    """Training batches ``(images, soft_targets)`` with ReLabel targets from a label store.

    Args:
        image_root: the ImageFolder tree; store row paths are relative to it.
        store: path of the label store (or an open :class:`LabelStore`); ``None`` trains on the
            tree's hard labels (one-hot targets, the baseline) with the same pipeline.
        batch_size: samples per batch on this rank.
        config: data settings (:class:`DataConfig`); ``config.layout`` overrides the store's.
        device: where images and targets are made: ``"cuda"``, ``"cuda:1"``, a ``torch.device``
            (decode on DALI's ``mixed`` backend, pool on the GPU), ``"cpu"``, or ``"auto"``.
        device_id: CUDA device when ``device`` names none (default: torch's current device).
        rank, world_size: default from ``torch.distributed`` or ``RANK``/``WORLD_SIZE``.
        shuffle: new permutation every epoch.
        return_labels: yield ``(images, targets, labels)``.
        return_rows: also yield the store rows of the batch (last element).
        check_files: at start-up, refuse a store whose rows do not match the image tree (checked
            once per store and tree, then remembered while the tree's folders are unchanged; see
            :mod:`dali_relabel.tree_check`).
        skip_bad_images: leave undecodable images out instead of raising (counted in
            :attr:`skipped_images`).
        start_epoch: epoch number of the first epoch (resuming).
        resume_batch: batches of ``start_epoch`` already trained on (from :meth:`state_dict`).

    Behaves like a ``torch.utils.data.DataLoader`` where training scripts rely on it: ``len()``,
    every ``iter()`` a new pass, ``set_epoch`` (also ``loader.sampler.set_epoch``), ``dataset``,
    ``batch_size``, ``drop_last``, ``state_dict``/``load_state_dict``, and ``mixup_enabled`` (timm
    switches mixing off with it).

    Crops, flips, colour jitter and random interpolation are drawn per sample from
    ``(config.seed, epoch, row)`` (:mod:`dali_relabel.crops`), so a resumed run sees exactly the crops
    an uninterrupted one would. CutMix and Mixup (``config.cutmix_probability``,
    ``config.mixup_alpha``) are applied before the batch is handed out: images carry their partner's
    pixels and targets are mixed (:mod:`dali_relabel.mixing`); ``config.label_smoothing`` last.

    Images are ``[B, 3, S, S]`` (``torch.channels_last`` memory format with ``config.channels_last``)
    in ``config.output_dtype``, targets ``[B, C]`` float32 (``[B, C, oh, ow]`` for an output grid).
    With ``last_batch="pad"`` the last batch may be smaller; it never contains padding.
    """

    def __init__(self, image_root, store, batch_size: int, config: Optional[DataConfig] = None,
                 device="auto", device_id: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None, shuffle: bool = True,
                 return_labels: bool = False, return_rows: bool = False, check_files: bool = True,
                 skip_bad_images: bool = False, start_epoch: int = 0, resume_batch: int = 0):
        from .pipelines.graphs import train_pipeline
        from .plugin import load_plugin, require_gpu_backend

        self.config = config = config or DataConfig()
        self.image_root = os.fspath(image_root)
        if store is None:  # hard labels of the image tree, as one-hot targets
            self.store = None
            images = list_images(self.image_root)
            paths, labels, self.class_names = PathTable.from_strings(images.relpaths), images.labels, images.classes
            self.num_classes, self.layout = len(images.classes), "HW"
            if config.cutmix_probability > 0 and config.cutmix_mode == "localized":
                raise ValueError("localized CutMix needs label maps (a store)")
        else:
            self.store = store if isinstance(store, LabelStore) else LabelStore(store)
            paths, labels = None, None  # the source maps the store's own in its worker
            if self.store.verified == "header":  # a store opened without the path checks
                try:
                    self.store.paths.check_confined("stored image paths")
                except ValueError as error:
                    raise StoreError(self.store.path, str(error)) from None
            if check_files:
                check_store_matches_images(self.store, self.image_root)
            self.class_names = self.store.class_names
            self.num_classes = self.store.num_classes
            self.layout = config.layout or self.store.layout
        rank, world_size = _resolve_rank(rank, world_size)
        self.device = resolve_device(device)
        index = device_index(device, device_id)
        load_plugin()  # the crop-window operator, and the pooling operator for soft targets
        if self.device == "gpu" and self.store is not None:
            require_gpu_backend()
        num_samples = len(self.store) if self.store is not None else len(paths)
        plan = EpochPlan(num_samples, batch_size, rank, world_size, seed=config.seed,
                         shuffle=shuffle, last_batch=config.last_batch)
        cutmix = None
        if config.cutmix_probability > 0:
            cutmix = CutMixSpec(config.cutmix_probability, config.cutmix_alpha, config.image_size,
                                seed=config.seed, stop_epoch=config.cutmix_stop_epoch,
                                per_batch=config.mix_granularity == "batch")
        output_map = ["images", "targets", "labels", "rows", "valid"]
        if cutmix is not None:
            output_map += ["mix_box"] + (["pasted"] if config.cutmix_mode == "localized" else [])
        store_path = self.store.path if self.store else None
        pipeline_kwargs = _pipeline_kwargs(config, batch_size, index)
        decoder = "mixed" if self.device == "gpu" else "cpu"

        def make_source(control, bad_rows):
            return BatchSource(self.image_root, plan, control, store_path=store_path, paths=paths,
                               labels=labels, epochs=True, cutmix=cutmix, bad_rows=bad_rows)

        def make_pipeline(source):
            return train_pipeline(source, config, self.num_classes, self.layout, decoder_device=decoder,
                                  **pipeline_kwargs)

        self.return_labels = return_labels
        self.return_rows = return_rows
        self.mixup_enabled = True
        self.dataset = LoaderDataset(self.image_root, self.class_names, num_samples)
        self.sampler = LoaderSampler(self)
        self.batch_sampler = None
        self.drop_last = config.last_batch == "drop"
        super().__init__(plan, make_source, make_pipeline, output_map, start_epoch=start_epoch,
                         resume_batch=resume_batch, skip_bad_images=skip_bad_images,
                         timeout=config.worker_timeout)

    def _mixing_enabled(self) -> bool:
        return self.mixup_enabled

    def _transform(self, batch: dict, current: _Pass) -> dict:
        return mix_batch(batch, self.config, self.num_classes, current.epoch, current.first + current.consumed - 1,
                         current.mixing)

    def __iter__(self):
        for batch in self._batches():
            out = [_as_torch_images(batch["images"], self.config), batch["targets"]]
            if self.return_labels:
                out.append(batch["labels"].reshape(-1).long())
            if self.return_rows:
                out.append(batch["rows"].reshape(-1))
            yield tuple(out)


class ValidationLoader(PipelineBatches):
    """Validation batches ``(images, labels)`` over an ImageFolder tree, every image exactly once per
    pass (over all ranks).

    Args:
        image_root: the tree (``root/<class>/<image>``).
        batch_size: samples per batch on this rank.
        config: data settings (``image_size``, ``crop_pct`` or ``val_resize``, ``val_interpolation``,
            normalisation, ``output_dtype``, ``channels_last``).
        classes: class names in label order (default: sorted folders; pass the store's
            ``class_names`` when evaluating a model trained on a store).
        return_rows: also yield the index of each image in the sorted file list (for ReaL labels).
        Other arguments as :class:`ReLabelLoader`; the DataLoader-like attributes too.
    """

    def __init__(self, image_root, batch_size: int, config: Optional[DataConfig] = None,
                 device="auto", device_id: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, return_rows: bool = False):
        from .pipelines.graphs import validation_pipeline

        self.config = config = (config or DataConfig()).replace(last_batch="pad")
        self.images = list_images(image_root, classes=classes)
        rank, world_size = _resolve_rank(rank, world_size)
        self.device = resolve_device(device)
        plan = EpochPlan(len(self.images), batch_size, rank, world_size, shuffle=False, last_batch="pad")
        paths = PathTable.from_strings(self.images.relpaths)
        labels = np.asarray(self.images.labels, dtype=np.int32)
        pipeline_kwargs = _pipeline_kwargs(config, batch_size, device_index(device, device_id))
        decoder = "mixed" if self.device == "gpu" else "cpu"

        def make_source(control, bad_rows):
            return BatchSource(self.images.root, plan, control, paths=paths, labels=labels, bad_rows=bad_rows)

        def make_pipeline(source):
            return validation_pipeline(source, config, decoder_device=decoder, **pipeline_kwargs)

        self.return_rows = return_rows
        self.dataset = LoaderDataset(self.images.root, self.images.classes, len(self.images))
        self.sampler = LoaderSampler(self)
        self.batch_sampler = None
        self.drop_last = False
        super().__init__(plan, make_source, make_pipeline, ["images", "labels", "rows", "valid"],
                         timeout=config.worker_timeout)

    def __iter__(self):
        for batch in self._batches():
            out = [_as_torch_images(batch["images"], self.config), batch["labels"].reshape(-1).long()]
            if self.return_rows:
                out.append(batch["rows"].reshape(-1))
            yield tuple(out)
