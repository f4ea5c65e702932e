"""Run the fused ``relabel.label_pooling`` operator on in-memory batches (outside a data pipeline).

Used by the tests, the operator benchmark and label-map tools: it builds one small DALI pipeline
whose external sources read the batch handed to :meth:`FusedLabelPooling.__call__`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


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

    Calling it with ``logits [B, k, H, W]``, ``class_ids [B, k, H, W]``, ``anchors [B, 2]``,
    ``shapes [B, 2]``, ``image_shapes [B, 2 or 3]``, optional ``mirror [B]`` (and ``region [B, 4]``
    when built with ``region_mode``) returns a float32
    tensor ``[B, C]`` (or ``[B, C, oh, ow]``). Any batch size up to ``max_batch_size`` may be passed,
    a different one at every call.
    """

    def __init__(self, num_classes: int, max_batch_size: int, layout: str = "HW",
                 output_size: Sequence[int] = (1, 1), temperature: float = 1.0,
                 apply_softmax: bool = True, device: str = "cpu", device_id: Optional[int] = None,
                 num_threads: int = 2, region_mode: Optional[str] = None, pool: bool = True):
        from nvidia.dali import fn, pipeline_def

        from .plugin import load_plugin, require_gpu_backend

        load_plugin()
        if device == "gpu":
            require_gpu_backend()
            if device_id is None:
                device_id = torch.cuda.current_device()
        else:
            device_id = None
        self._batch = batch = _Batch()

        @pipeline_def(batch_size=max_batch_size, num_threads=num_threads,
                      device_id=device_id, prefetch_queue_depth=1)
        def pooling_graph():
            # Zero-argument callables: DALI would pass an iteration number to a one-argument one.
            count = 7 if region_mode else 6
            inputs = [fn.external_source(source=_field_reader(batch, i), batch=True) for i in range(count)]
            if not pool:  # every input stays an output, so DALI prunes none of the feeding
                return tuple(x.gpu() if device == "gpu" else x for x in inputs)
            extra = {"region_mode": region_mode} if region_mode else {}
            return fn.relabel.label_pooling(*inputs, device=device, num_classes=num_classes,
                                            layout=layout, output_size=list(output_size),
                                            temperature=temperature, apply_softmax=apply_softmax,
                                            **extra)

        self.device = device
        self.device_id = device_id
        self.pipeline = pooling_graph()
        self.pipeline.build()

    def __call__(self, logits, class_ids, anchors, shapes, image_shapes, mirror=None,
                 region=None) -> torch.Tensor:
        batch = len(logits)
        mirror = np.zeros(batch, dtype=np.int32) if mirror is None else mirror
        fields = (logits, class_ids, anchors, shapes, image_shapes, mirror)
        if region is not None:
            fields += (np.asarray(region, dtype=np.float32),)
        # A batch given as one contiguous [B, ...] array is copied into DALI in one piece.
        self._batch.fields = [np.ascontiguousarray(np.asarray(f).reshape(batch, -1) if i >= 2 else np.asarray(f))
                      for i, f in enumerate(fields)]
        out = self.pipeline.run()[0]
        if self.device == "gpu":
            out = out.as_cpu()
        return torch.from_numpy(out.as_array())  # every sample has the same shape: one copy
