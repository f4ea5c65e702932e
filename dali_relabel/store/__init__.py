"""The HDF5 label-map store: the format (``format``), the writer (``writer``) and the reader
(``reader``), validated at open.

The format (version 2) is specified in ``docs/store_format.md``. In short: one file, one row per
image, ``logits [N, k, H, W]`` float16 and ``class_ids [N, k, H, W]`` (smallest unsigned type that
holds ``num_classes``), each row's relative image path (one contiguous byte buffer plus offsets), hard
label and image size, and the class names. Every value is checked once, when it is written, and the
file records that together with a SHA-256 per block of rows. Readers map the big arrays into memory
(so gathering a batch of random rows costs one numpy fancy-index and every process on a node shares
the page cache), check the header and a sample of the hashes at open, and open the file lazily in
each process, so a store object can be handed to DALI workers and DDP ranks before or after ``fork``.
Version 1 files (paths as HDF5 strings, nothing recorded) are still read.
"""
from .format import (FORMAT_NAME, FORMAT_VERSION, HASH_CHUNK_ROWS, PARTIAL_SUFFIX, READABLE_VERSIONS,
                     VERIFY_LEVELS, StoreError, StoreHeader, check_map_values, class_id_dtype, content_hash_v1,
                     map_value_problem, paths_digest, plan_hash, root_hash, row_bytes)
from .reader import LabelMap, LabelStore, summarize
from .writer import StoreWriter, write_store

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HASH_CHUNK_ROWS", "PARTIAL_SUFFIX", "READABLE_VERSIONS",
           "VERIFY_LEVELS", "LabelMap", "LabelStore", "StoreError", "StoreHeader", "StoreWriter", "check_map_values",
           "class_id_dtype", "content_hash_v1", "map_value_problem", "paths_digest", "plan_hash", "root_hash",
           "row_bytes", "summarize", "write_store"]
