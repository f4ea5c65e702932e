"""Benchmarks of dali-relabel, run from the repository root (see benchmarks/README.md):

- ``python -m benchmarks.throughput``: training loaders (plain DALI, DALI's example graph, dali-relabel,
  the authors' approach) and feed-only, per batch size;
- ``python -m benchmarks.operator``: the fused label-pooling operator against the dense reference;
- ``python -m benchmarks.store_read``: store rows against per-image ``.pt`` files;
- ``benchmarks/gpu_check.sh``: a one-shot check on a GPU machine (install, plugin, tests, benchmarks),
  reported by :mod:`benchmarks.gpu_summary` (``summary.json`` and one archive).

Shared: :mod:`benchmarks.common` (folders, errors, entry point), :mod:`benchmarks.data` (generated
data), :mod:`benchmarks.report` (machine, versions, summaries, outputs), :mod:`benchmarks.timing`
(alternating timing), :mod:`benchmarks.contenders`.
"""
