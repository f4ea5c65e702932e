"""Store-read benchmark: a random batch of rows from the HDF5 label store vs ``torch.load`` of as
many per-image ``.pt`` files (the authors' release format). Same as ``dali-relabel bench --store-read``::

    python -m benchmarks.store_read [--store-rows 32768] [--store-batch 256] [--repeats 5]

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
    sys.exit(main(["bench", "--store-read"] + sys.argv[1:]))
