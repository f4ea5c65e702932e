"""Alternating timing: contenders take turns ``A B C A B C ...`` on one machine in one run.

A :class:`Contender` is an endless stream of batches. :func:`alternate` warms every contender up,
then for each repeat gives each one a timed segment of ``timed`` batches. Two things keep one
contender's work out of another's segment:

- before each segment, the ``drain`` batches the contender prepared ahead while the others ran (DALI's
  prefetch queue, the DataLoader's prefetch) are taken untimed, so a segment never profits from work
  done while another contender was being timed;
- after each segment, the contender refills that queue in the background; :func:`alternate` waits until
  this process and its children (DALI threads, source workers, DataLoader workers) are idle again
  (:func:`wait_until_idle`), so the refill does not slow down the next contender's segment (on a small
  machine the DataLoader's refill of 4 batches is seconds of CPU).

Epoch boundaries that fall inside a segment are timed. Each segment also records the CPU time the
benchmark's process tree spent per sample, a measure of the work itself that other programs on the
machine hardly change.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from dali_relabel.processes import stat_fields

from .common import BenchError, log


@dataclass
class Contender:
    """One thing to time.

    Attributes:
        name: key in the results (``plain``, ``relabel``, ...).
        label: what it is, in words (tables and charts).
        stream: endless iterator of batches.
        count: samples in a batch.
        drain: batches it may have prepared while idle; taken untimed before each segment.
        check: optional ``batch -> float`` recorded for the last batch (e.g. soft-target sum error).
        settings: what it ran with (threads, workers, ...), stored in the results.
        close: releases its workers and pipelines.
    """

    name: str
    label: str
    stream: Iterator
    count: Callable[[object], int]
    drain: int
    check: Optional[Callable[[object], float]] = None
    settings: dict = field(default_factory=dict)
    close: Optional[Callable[[], None]] = None
    last_batch: object = None
    settled: List[float] = field(default_factory=list)  # seconds waited for it to go idle, per segment
    cpu_ms_per_sample: List[float] = field(default_factory=list)  # CPU time of the process tree, per segment


def endless(epoch: Callable[[], Iterator]) -> Iterator:
    """Batches of epoch after epoch (``epoch()`` starts one)."""
    while True:
        empty = True
        for batch in epoch():
            empty = False
            yield batch
        if empty:
            raise BenchError("a contender produced an empty epoch")


def take(contender: Contender, batches: int) -> int:
    """Take ``batches`` batches; returns the samples they held."""
    samples = 0
    for _ in range(batches):
        batch = next(contender.stream)
        samples += contender.count(batch)
        contender.last_batch = batch
    return samples


def _sync(device: str) -> None:
    if device == "gpu":
        import torch

        torch.cuda.synchronize()


def time_segment(contender: Contender, batches: int, device: str = "cpu") -> Tuple[float, float, Optional[float]]:
    """``(samples per second, seconds per batch, CPU milliseconds per sample)`` over ``batches`` batches,
    after draining what was prepared while idle. The CPU time is that of this process and its children
    (:func:`tree_cpu_seconds`) during the segment: unlike the rate, it hardly changes when other
    programs compete for the cores (``None`` without ``/proc``)."""
    take(contender, contender.drain)
    _sync(device)
    cpu_start = tree_cpu_seconds()
    start = time.perf_counter()
    samples = take(contender, batches)
    _sync(device)
    seconds = time.perf_counter() - start
    cpu_end = tree_cpu_seconds()
    cpu_ms = None if cpu_start is None or cpu_end is None else 1e3 * (cpu_end - cpu_start) / samples
    return samples / seconds, seconds / batches, cpu_ms


def tree_cpu_seconds(root: Optional[int] = None) -> Optional[float]:
    """CPU seconds (user + system, all threads) used so far by process ``root`` (default: this one) and
    all its descendants, from Linux's ``/proc``; ``None`` where there is no ``/proc``."""
    root = os.getpid() if root is None else root
    stats = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        fields = stat_fields(int(name)) if name.isdigit() else []  # state ppid ... utime stime
        if fields:  # (else gone meanwhile)
            stats[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        ticks += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_until_idle(threshold: float = 0.1, window: float = 0.3, limit: float = 30.0,
                    fallback: float = 0.0) -> float:
    """Wait until this process and its descendants use less than ``threshold`` cores over a ``window``
    (or ``limit`` seconds passed); returns the seconds waited. Without ``/proc``, sleeps ``fallback``."""
    start = last_time = time.perf_counter()
    last = tree_cpu_seconds()
    if last is None:
        time.sleep(fallback)
        return fallback
    while True:
        time.sleep(window)
        now, cpu = time.perf_counter(), tree_cpu_seconds()
        if cpu is None or (cpu - last) / (now - last_time) < threshold or now - start >= limit:
            return now - start
        last, last_time = cpu, now


def alternate(contenders: Sequence[Contender], warmup: int, timed: int, repeats: int, device: str = "cpu",
              unit: str = "samples/s", prefix: str = "", settle: bool = True) -> Dict[str, List[float]]:
    """Warm each contender up with ``warmup`` batches, then ``repeats`` rounds of one timed segment
    of ``timed`` batches per contender, in the given order (after each segment waiting until the
    process tree is idle, unless ``settle`` is off); returns the rates per contender."""
    for c in contenders:
        take(c, warmup)
    log(f"{prefix}warm-up done ({warmup} batches each); timing {timed} batches per segment, {repeats} "
        f"repeats, alternating {' '.join(c.name for c in contenders)}")
    rates: Dict[str, List[float]] = {c.name: [] for c in contenders}
    for repeat in range(repeats):
        line = []
        for c in contenders:
            rate, per_batch, cpu_ms = time_segment(c, timed, device)
            rates[c.name].append(rate)
            if cpu_ms is not None:
                c.cpu_ms_per_sample.append(cpu_ms)
            line.append(f"{c.name} {rate:,.0f}" + (f" ({cpu_ms:.2f} CPU ms)" if cpu_ms is not None else ""))
            if settle:
                c.settled.append(wait_until_idle(fallback=c.drain * per_batch))
        log(f"{prefix}repeat {repeat + 1}/{repeats}: " + ", ".join(line) + f" {unit}")
    return rates


def close_all(contenders: Sequence[Contender]) -> None:
    """Stop every contender's workers and pipelines (before the next group is built)."""
    import gc

    for c in contenders:
        if c.close is not None:
            c.close()
        close_stream = getattr(c.stream, "close", None)
        if close_stream is not None:
            close_stream()
        c.stream = c.last_batch = None
    gc.collect()
