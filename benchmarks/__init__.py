"""Benchmarks of dali-relabel (``python -m benchmarks.run``, ``python -m benchmarks.store_read``)."""
