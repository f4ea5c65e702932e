"""Throughput benchmark: plain DALI vs dali-relabel vs the authors' loader, and the fused operator.

Same code as ``dali-relabel bench`` (it lives in ``dali_relabel/bench.py``). Run from the repository
root::

    python -m benchmarks.run --device cpu            # or: python benchmarks/run.py ...
    python -m benchmarks.run --store-read            # the store-read benchmark (see store_read.py)

See benchmarks/README.md.
"""
import os
import sys

try:
    from dali_relabel.cli import main
except ImportError:  # not installed: use the checkout this file lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dali_relabel.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
