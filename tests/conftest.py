"""Test setup: make the repository root and tests/ importable; skip GPU tests without a GPU; keep
forked children away from earlier tests' garbage; the tiny tree plus store, built once a session;
keep `slow` work (DALI pipelines, processes, network) out of the unmarked tests, so that
`pytest -m "not slow"` stays the fast inner loop; name the random test order (pytest-randomly) when
something fails; fail a session that leaves a process, thread or temporary file behind."""
import gc
import multiprocessing.process
import os
import shutil
import socket
import subprocess
import sys
import threading

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


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """The tiny tree plus store (``helpers.make_tiny_set``), built once a session and shared: a test
    must not change it (:func:`_tiny_set_stays_unchanged` fails one that does); a test that changes the
    tree or the store takes ``tiny_set_copy``."""
    from helpers import make_tiny_set

    return make_tiny_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_set_copy(tiny_set, tmp_path):
    """A copy of the tiny tree plus store of this test's own, free to change."""
    from dataclasses import replace

    root = str(tmp_path / "tiny")
    shutil.copytree(tiny_set.root, root)
    return replace(tiny_set, root=root, images=os.path.join(root, os.path.relpath(tiny_set.images, tiny_set.root)),
                   store=os.path.join(root, os.path.relpath(tiny_set.store, tiny_set.root)))


@pytest.fixture(autouse=True)
def _tiny_set_stays_unchanged(request):
    """Fail a test that adds, removes or rewrites a file of the shared tiny set."""
    if "tiny_set" not in request.fixturenames:
        yield
        return
    from helpers import tree_snapshot

    shared = request.getfixturevalue("tiny_set")
    before = tree_snapshot(shared.root)
    yield
    after = tree_snapshot(shared.root)
    if after != before:
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        pytest.fail(f"{request.node.nodeid} changed the shared tiny set ({', '.join(changed[:5])}); a test that "
                    f"changes the tree or the store takes the tiny_set_copy fixture", pytrace=False)


class SlowWorkOutsideSlowTest(Exception):
    """What a test without the `slow` mark meets when it builds a DALI pipeline, starts a process or
    connects to the network."""


class _SlowWorkGuard:
    """`pytest -m "not slow"` is the inner loop: it stays fast only while every test that builds or
    runs a DALI pipeline, starts a process (subprocess, multiprocessing, fork) or connects to the
    network carries the `slow` mark. While a test without it runs (its fixtures' setup and teardown
    included, whatever their scope), each of these raises :class:`SlowWorkOutsideSlowTest` naming the
    test and what it did; the test fails even where the code under test catches the exception."""

    test = None  # the node id of the running test without the `slow` mark
    seen = []  # what it was refused
    pid = os.getpid()
    # Libraries that run a helper program once per machine or process, whichever test first needs
    # them (matplotlib's font cache runs fc-list on a fresh machine): not the test's own work.
    ONE_TIME_PROBES = ("matplotlib.font_manager", "ctypes.util", "platform", "uuid")

    @classmethod
    def _one_time_probe(cls):
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_globals.get("__name__") in cls.ONE_TIME_PROBES:
                return True
            frame = frame.f_back
        return False

    @classmethod
    def check(cls, what):
        # Only the test's own thread: a helper thread of an earlier slow test's loader (the next
        # epoch's pipeline built ahead) may still be building while an unmarked test runs.
        if cls.test is not None and os.getpid() == cls.pid and threading.current_thread() is threading.main_thread() \
                and not cls._one_time_probe():
            message = (f"{cls.test} {what} but is not marked slow: mark it @pytest.mark.slow (or set "
                       f"pytestmark = pytest.mark.slow in its file), or keep that work out of it")
            cls.seen.append(message)
            raise SlowWorkOutsideSlowTest(message)

    @classmethod
    def wrap(cls, owner, name, what, applies=lambda *args: True):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            if applies(*args):
                cls.check(what)
            return original(*args, **kwargs)

        guarded.__wrapped__ = original
        setattr(owner, name, guarded)

    @classmethod
    def install(cls):
        cls.wrap(subprocess.Popen, "__init__", "starts a subprocess")
        cls.wrap(multiprocessing.process.BaseProcess, "start", "starts a process")
        cls.wrap(os, "fork", "forks")
        cls.wrap(socket.socket, "connect", "connects to the network",
                 lambda sock, *_: sock.family in (socket.AF_INET, socket.AF_INET6))
        try:
            from nvidia.dali.pipeline import Pipeline
        except ImportError:
            return
        cls.wrap(Pipeline, "build", "builds or runs a DALI pipeline")  # run() and the iterators call it


_SlowWorkGuard.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Arm the slow-work guard for the setup, call and teardown of a test without the `slow` mark."""
    _SlowWorkGuard.test = None if "slow" in item.keywords else item.nodeid
    _SlowWorkGuard.seen = []
    try:
        yield
    finally:
        _SlowWorkGuard.test = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that passed although the slow-work guard refused something (the code under test caught
    the exception) fails, saying what was refused."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed and _SlowWorkGuard.seen:
        report.outcome = "failed"
        report.longrepr = _SlowWorkGuard.seen[0]


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



_SESSION_START = {}


def pytest_sessionstart(session):
    """Temporary directories of the session's own, and what ran before the first test (see
    :mod:`leftovers`). pytest's ``tmp_path`` root is fixed first, so it stays where pytest keeps it."""
    import leftovers

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        factory.getbasetemp()
    _SESSION_START["snapshot"] = leftovers.start_session()


def pytest_sessionfinish(session, exitstatus):
    """No test leaves a child process, a thread or a temporary file behind: the session fails,
    listing them, if one did."""
    import leftovers

    start = _SESSION_START.pop("snapshot", None)
    if start is None or start.pid != os.getpid():
        return
    found = leftovers.finish_session(start)
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["the tests left these behind (a test must stop, join or remove what it starts or creates):"]
    lines += [f"  {item}" for item in found]
    if reporter is not None:
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    if session.exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
