"""Test setup: make the repository root and tests/ importable; skip GPU tests without a GPU; keep
forked children away from earlier tests' garbage; name the random test order (pytest-randomly) when
something fails."""
import gc
import os
import sys

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)

if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

try:
    import dali_relabel  # noqa: F401
except ImportError:
    sys.path.insert(0, _ROOT)
    import dali_relabel  # noqa: F401


class _ForkGuard:
    """Several tests fork inside the test process (process pools, gloo ranks, DALI's source
    workers). A child inherits every object, including garbage that earlier tests left in reference
    cycles, such as DALI pipelines; when the child's garbage collector tears such a pipeline down, the
    child crashes, so a test would pass or fail depending on which tests ran before it. Frozen
    objects are never collected: freeze everything for the moment of each fork."""

    enabled = True

    @classmethod
    def before(cls):
        if cls.enabled:
            gc.freeze()

    @classmethod
    def after_in_parent(cls):
        if cls.enabled:
            gc.unfreeze()


os.register_at_fork(before=_ForkGuard.before, after_in_parent=_ForkGuard.after_in_parent)


@pytest.fixture
def unguarded_fork():
    """For tests of code that must protect its own forks: no freezing around forks meanwhile."""
    _ForkGuard.enabled = False
    try:
        yield
    finally:
        _ForkGuard.enabled = True


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests where torch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Under failures, say how to repeat the test order: `-q` hides pytest-randomly's header."""
    seed = getattr(config.option, "randomly_seed", None)
    if exitstatus not in (0, 5) and isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"The tests ran in random order (pytest-randomly): repeat it with "
                                    f"-p randomly --randomly-seed={seed}, or use -p no:randomly for file order.")
