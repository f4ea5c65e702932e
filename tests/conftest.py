"""Test setup: make the repository root and tests/ importable."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)

if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

try:
    import dali_relabel  # noqa: F401
except ImportError:
    sys.path.insert(0, _ROOT)
    import dali_relabel  # noqa: F401


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests where torch sees no CUDA GPU."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
