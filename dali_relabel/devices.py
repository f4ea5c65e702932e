"""Which device a loader runs on, and how its DALI source workers may be started there."""
from __future__ import annotations

from typing import Optional

import torch


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


def worker_start_method(requested: str) -> str:
    """The start method for DALI's source workers: ``requested``, but ``"spawn"`` instead of
    ``"fork"`` once this process has initialised the CUDA driver (forked workers would break).

    Asks DALI's own check: ``torch.cuda.is_available()`` initialises the driver without making
    ``torch.cuda.is_initialized()`` true."""
    from nvidia.dali.backend import IsDriverInitialized

    if requested == "fork" and IsDriverInitialized():
        return "spawn"
    return requested
