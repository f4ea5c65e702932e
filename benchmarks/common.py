"""What every benchmark suite shares: default folders, the error type, logging and the entry point.

Each suite module (``throughput``, ``operator``, ``store_read``) defines ``add_arguments(parser)`` and
``run(args) -> dict`` and ends with ``sys.exit(main_for(...))``; :func:`main_for` builds the parser,
turns a :class:`BenchError` into a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
#: Generated image sets and stores, reused between runs (git-ignored).
DATA_DIR = os.path.join(BENCH_DIR, ".data")
#: JSON, PNG and markdown results (committed).
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


class BenchError(RuntimeError):
    """A benchmark cannot run with the given settings."""


def log(message: str) -> None:
    print(message, flush=True)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def int_list(text: str) -> List[int]:
    """argparse type: comma-separated positive integers, e.g. ``64,128,256`` (may be empty)."""
    values = []
    for item in (t.strip() for t in str(text).split(",")):
        if item:
            values.append(positive_int(item))
    return values


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DATA_DIR,
                        help="where generated data is cached and reused (default: benchmarks/.data)")
    parser.add_argument("--out-dir", default=RESULTS_DIR,
                        help="where the JSON, PNG and markdown results go (default: benchmarks/results)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and the loaders")


def main_for(doc: Optional[str], add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], dict], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Parse ``argv`` for one suite and run it; 0 on success, 2 (with a message) on :class:`BenchError`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except BenchError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    return 0
