"""The process group from the ``torchrun`` environment, and this process's place in it."""
from __future__ import annotations

import datetime
import os
from typing import Optional, Tuple

import torch


def rank_and_world() -> Tuple[int, int]:
    """``(global rank, world size)`` from ``torch.distributed``, else ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_rank(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """``(rank, world_size)`` as given, each ``None`` taken from :func:`rank_and_world`."""
    default_rank, default_world = rank_and_world()
    return (default_rank if rank is None else rank), (default_world if world_size is None else world_size)


def init_from_env(use_gpu: bool, timeout: Optional[datetime.timedelta] = None) -> bool:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, gloo on CPU), if there is one and
    it is not joined yet; sets the CUDA device from ``LOCAL_RANK``. Returns True if joined here."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend="nccl" if use_gpu else "gloo", **kwargs)
    return True
