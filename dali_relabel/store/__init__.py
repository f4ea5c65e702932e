"""The HDF5 stores: the label-map store (``format``, ``writer``, ``reader``) and the region store
(``region_format``, ``region_writer``, ``region_reader``, ``region_targets``), both validated at open,
sharing their writing and reading machinery (``rowfile``); ``kinds`` opens either.

The map format (version 2) is specified in ``docs/store_format.md``. In short: one file, one row per
image, ``logits [N, k, H, W]`` float16 and ``class_ids [N, k, H, W]`` (smallest unsigned type that
holds ``num_classes``), each row's relative image path (one contiguous byte buffer plus offsets), hard
label and image size, and the class names. Every value is checked once, when it is written, and the
file records that together with a SHA-256 per block of rows. Readers map the big arrays into memory
(so gathering a batch of random rows costs one numpy fancy-index and every process on a node shares
the page cache), check the header and a sample of the hashes at open, and open the file lazily in
each process, so a store object can be handed to DALI workers and DDP ranks before or after ``fork``.
Version 1 files (paths as HDF5 strings, nothing recorded) are still read.

The region store (version 1, same document) holds per image R stored crops: ``boxes [N, R, 4]``
(x0, y0, w, h in source pixels), ``flips [N, R]``, and the teacher's top-k ``class_ids`` and
``values`` (probabilities) ``[N, R, k]`` per crop (FKD's soft labels), with the same guarantees.
"""
from .format import (FORMAT_NAME, FORMAT_VERSION, HASH_CHUNK_ROWS, PARTIAL_SUFFIX, READABLE_VERSIONS,
                     VERIFY_LEVELS, StoreError, StoreHeader, check_map_values, class_id_dtype, content_hash_v1,
                     map_value_problem, paths_digest, plan_hash, root_hash, row_bytes)
from .kinds import open_store, store_kind, summarize_store
from .reader import LabelMap, LabelStore, summarize
from .region_format import LABEL_TYPES, REGION_FORMAT_NAME, REGION_FORMAT_VERSION, RegionHeader
from .region_reader import RegionLabels, RegionStore, summarize_regions
from .region_targets import REGION_STREAM, dense_targets, pixel_windows, select_regions
from .region_writer import RegionWriter, write_region_store
from .writer import StoreWriter, write_store

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HASH_CHUNK_ROWS", "LABEL_TYPES", "PARTIAL_SUFFIX", "READABLE_VERSIONS",
           "REGION_FORMAT_NAME", "REGION_FORMAT_VERSION", "REGION_STREAM", "VERIFY_LEVELS", "LabelMap", "LabelStore",
           "RegionHeader", "RegionLabels", "RegionStore", "RegionWriter", "StoreError", "StoreHeader", "StoreWriter",
           "check_map_values", "class_id_dtype", "content_hash_v1", "dense_targets", "map_value_problem",
           "open_store", "paths_digest", "pixel_windows", "plan_hash", "root_hash", "row_bytes", "select_regions",
           "store_kind", "summarize", "summarize_regions", "summarize_store", "write_region_store", "write_store"]
