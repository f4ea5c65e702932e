"""Run the fused ``relabel.label_pooling`` operator on in-memory batches (outside a data pipeline).

Used by the tests, the operator benchmark and label-map tools: it builds one small DALI pipeline
whose external sources read the batch handed to :meth:`FusedLabelPooling.__call__`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import DaliRelabelError


class FusedArgumentError(DaliRelabelError, ValueError):
    """A call does not fit how the :class:`FusedLabelPooling` was built (e.g. an affine without
    ``output_image_size``) or passes a wrongly shaped array."""


class _Batch:
    """The arrays of the batch being run, read by the pipeline's sources. Kept apart from
    :class:`FusedLabelPooling` so that its pipeline holds no reference back to it: no reference
    cycle, so the pipeline (and its threads) go as soon as the object does, not whenever the garbage
    collector runs (possibly inside a forked child, where tearing a pipeline down crashes it)."""

    fields = None


def _field_reader(batch: _Batch, index: int):
    return lambda: batch.fields[index]


class FusedLabelPooling:
    """The fused operator as a function of host arrays.

    Args:
        num_classes: C.
        max_batch_size: the largest batch that will be passed.
        layout, output_size, temperature, apply_softmax: the operator's arguments.
        region_mode: ``"inside"`` or ``"outside"`` to pass a ``region`` to each call (CutMix).
        pool: ``False`` builds the same pipeline without the operator: every input is moved to
            ``device`` and the logits come back (to measure the feeding overhead).
        device: ``"cpu"`` or ``"gpu"`` (the CUDA backend; results are copied back to the host).
        device_id: the CUDA device for ``"gpu"`` (default: torch's current device).
        num_threads: DALI CPU threads.
        output_image_size: ``(h, w)`` of the output image in pixels: builds the operator with its
            per-sample ``affine`` argument (labels that follow geometric ops), which works in that
            space. ``None`` (default): no ``affine``, the operator as before.
        canvas_checks: with ``output_image_size``, also build the operator with its per-sample
            ``canvas_checks`` argument (exact pooling for a chain of geometric ops).

    Calling it with ``logits [B, k, H, W]``, ``class_ids [B, k, H, W]``, ``anchors [B, 2]``,
    ``shapes [B, 2]``, ``image_shapes [B, 2 or 3]``, optional ``mirror [B]`` (and ``region [B, 4]``
    when built with ``region_mode``; ``affine [B, 2, 3]`` when built with ``output_image_size``: per
    sample the map from an output pixel position ``(x, y)`` to ``affine @ (x, y, 1)`` in the resized,
    flipped crop, pixel centres at ``i + 0.5``; ``None`` is the identity, today's pooling exactly;
    ``canvas_checks`` when built with them: ``[B, m, 2, 3]`` or a list of ``B`` ``[m, 2, 3]`` arrays,
    ``m`` may differ per sample and be 0; ``None``: none) returns a float32
    tensor ``[B, C]`` (or ``[B, C, oh, ow]``). Any batch size up to ``max_batch_size`` may be passed,
    a different one at every call.
    """

    def __init__(self, num_classes: int, max_batch_size: int, layout: str = "HW",
                 output_size: Sequence[int] = (1, 1), temperature: float = 1.0,
                 apply_softmax: bool = True, device: str = "cpu", device_id: Optional[int] = None,
                 num_threads: int = 2, region_mode: Optional[str] = None, pool: bool = True,
                 output_image_size: Optional[Sequence[int]] = None, canvas_checks: bool = False):
        from nvidia.dali import fn, pipeline_def

        from .plugin import load_plugin, require_gpu_backend

        load_plugin()
        if device == "gpu":
            require_gpu_backend()
            if device_id is None:
                device_id = torch.cuda.current_device()
        else:
            device_id = None
        if canvas_checks and output_image_size is None:
            raise FusedArgumentError("canvas_checks needs output_image_size=(h, w), the output image's size in pixels")
        self._batch = batch = _Batch()

        @pipeline_def(batch_size=max_batch_size, num_threads=num_threads,
                      device_id=device_id, prefetch_queue_depth=1)
        def pooling_graph():
            # Zero-argument callables: DALI would pass an iteration number to a one-argument one.
            count = 7 if region_mode else 6
            inputs = [fn.external_source(source=_field_reader(batch, i), batch=True) for i in range(count)]
            extra = {"region_mode": region_mode} if region_mode else {}
            if output_image_size is not None:
                extra["affine"] = fn.external_source(source=_field_reader(batch, count), batch=True)
                extra["output_image_size"] = [int(v) for v in output_image_size]
            if canvas_checks:
                extra["canvas_checks"] = fn.external_source(source=_field_reader(batch, count + 1), batch=True)
            if not pool:  # every input stays an output, so DALI prunes none of the feeding
                feeding = inputs + [extra[name] for name in ("affine", "canvas_checks") if name in extra]
                return tuple(x.gpu() if device == "gpu" else x for x in feeding)
            return fn.relabel.label_pooling(*inputs, device=device, num_classes=num_classes,
                                            layout=layout, output_size=list(output_size),
                                            temperature=temperature, apply_softmax=apply_softmax,
                                            **extra)

        self.device = device
        self.device_id = device_id
        self.output_image_size = None if output_image_size is None else tuple(int(v) for v in output_image_size)
        self.canvas_checks = bool(canvas_checks)
        self.pipeline = pooling_graph()
        self.pipeline.build()

    def __call__(self, logits, class_ids, anchors, shapes, image_shapes, mirror=None,
                 region=None, affine=None, canvas_checks=None) -> torch.Tensor:
        batch = len(logits)
        mirror = np.zeros(batch, dtype=np.int32) if mirror is None else mirror
        fields = (logits, class_ids, anchors, shapes, image_shapes, mirror)
        if region is not None:
            fields += (np.asarray(region, dtype=np.float32),)
        # A batch given as one contiguous [B, ...] array is copied into DALI in one piece.
        fields = [np.ascontiguousarray(np.asarray(f).reshape(batch, -1) if i >= 2 else np.asarray(f))
                  for i, f in enumerate(fields)]
        if self.output_image_size is not None:
            fields.append(_affines(affine, batch))
        elif affine is not None:
            raise FusedArgumentError("an affine needs the FusedLabelPooling built with output_image_size=(h, w), "
                                     "the output image's size in pixels")
        if self.canvas_checks:
            fields.append(_canvas_checks(canvas_checks, batch))
        elif canvas_checks is not None:
            raise FusedArgumentError("canvas_checks need the FusedLabelPooling built with canvas_checks=True")
        self._batch.fields = fields
        out = self.pipeline.run()[0]
        if self.device == "gpu":
            out = out.as_cpu()
        return torch.from_numpy(out.as_array())  # every sample has the same shape: one copy


def _affines(affine, batch: int) -> np.ndarray:
    """``affine`` as a contiguous float32 ``[B, 2, 3]`` batch; ``None``: identities."""
    if affine is None:
        return np.ascontiguousarray(np.broadcast_to(np.eye(2, 3, dtype=np.float32), (batch, 2, 3)))
    affine = np.asarray(affine.cpu() if torch.is_tensor(affine) else affine)
    if affine.shape != (batch, 2, 3):
        raise FusedArgumentError(f"affine must be [B, 2, 3] = [{batch}, 2, 3], got shape {list(affine.shape)}")
    return np.ascontiguousarray(affine, dtype=np.float32)


def _canvas_checks(checks, batch: int) -> list:
    """``checks`` as ``batch`` contiguous float32 ``[m, 2, 3]`` arrays (``m`` may differ per sample);
    ``None``: none (``m = 0``)."""
    if checks is None:
        return [np.zeros((0, 2, 3), np.float32) for _ in range(batch)]
    if torch.is_tensor(checks):
        checks = checks.cpu().numpy()
    if len(checks) != batch:
        raise FusedArgumentError(f"canvas_checks must hold one [m, 2, 3] array per sample ({batch}), got {len(checks)}")
    out = []
    for n, sample in enumerate(checks):
        sample = np.asarray(sample.cpu() if torch.is_tensor(sample) else sample)
        if sample.ndim != 3 or sample.shape[1:] != (2, 3):
            raise FusedArgumentError(f"canvas_checks of sample {n} must be [m, 2, 3], got shape {list(sample.shape)}")
        out.append(np.ascontiguousarray(sample, dtype=np.float32))
    return out
