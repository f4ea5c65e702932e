"""Exact float64 constants in a DALI graph (``fn.constant`` has no float64: int64 bits reinterpreted)."""
import numpy as np
from nvidia.dali import fn, types


def f64_constant(values):
    """A float64 constant DataNode holding exactly ``values`` (any shape, CPU)."""
    bits = np.ascontiguousarray(np.asarray(values, np.float64)).view(np.int64)
    return fn.reinterpret(types.Constant(bits, dtype=types.INT64), dtype=types.FLOAT64)
