"""Find, check, build if needed, and load the label-pooling DALI plugin (once per process).

A library is loaded only if its ``manifest.json`` says it was built from these sources for the DALI
running now (version, flavour, library size); anything else is skipped, never loaded, because a
plugin built for another DALI fails with undefined symbols or worse. Places looked at, in order:

1. ``$DALI_RELABEL_PLUGIN_DIR`` (a directory holding the library and its manifest);
2. ``dali_relabel/ops/_prebuilt/`` (built by ``setup.py`` when DALI was importable at install time);
3. the per-DALI cache ``$XDG_CACHE_HOME/dali_relabel/plugin/<dali version>-<flavour>-<source hash>/``
   (``~/.cache`` without ``XDG_CACHE_HOME``). A fitting build is loaded from wherever it is, read-only
   places included; a cache that cannot be written when a build is needed (read-only home) is a
   :class:`PluginError` naming the directory and the two variables that point elsewhere.

If none fits, the plugin is compiled into the cache (once, under a file lock, so DDP ranks and DALI
workers wait for one build) unless ``DALI_RELABEL_NO_BUILD=1``; then a :class:`PluginError` says how
to build it (``dali-relabel build-plugin``). Builds are cached per DALI version and flavour, so
switching flavours (uninstall one, install the other) builds once for the new one and keeps the old
build for switching back. Two flavours installed at once, or a DALI whose files an uninstall deleted,
is a :class:`PluginError` naming the ``pip`` commands that fix it.

A machine without nvcc (a GPU node with the driver only) builds the CPU backend alone. Its CUDA
backend can be built on any machine with nvcc and the same DALI version and flavour (no GPU needed):
``dali-relabel build-plugin`` there prints the directory; copy it over and point
``DALI_RELABEL_PLUGIN_DIR`` at it.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Dict, List, Optional

from . import plugin_build
from ..errors import DaliRelabelError

_loaded: Optional[Dict] = None


class PluginError(DaliRelabelError, RuntimeError):
    """The plugin is missing, stale or failed to build; the message says how to fix it."""


# How to get a plugin with the CUDA backend onto a machine that cannot compile it.
ELSEWHERE = ("or build it on a machine that has nvcc and the same DALI version and flavour (no GPU "
             "needed there), copy the directory `dali-relabel build-plugin` prints to this machine and "
             "set DALI_RELABEL_PLUGIN_DIR to it (it holds libdali_relabel.so and manifest.json)")


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dali_relabel", "plugin")


def cache_dir(identity: Dict) -> str:
    """The cache directory for the running DALI and these sources."""
    flavour = str(identity["dali_flavour"]).replace("nvidia-dali-", "")
    return os.path.join(_cache_root(), f"{identity['dali_version']}-{flavour}-{plugin_build.source_hash()}")


def _identity() -> Dict:
    """:func:`plugin_build.dali_identity`, with a broken or missing DALI as a :class:`PluginError`."""
    try:
        return plugin_build.dali_identity()
    except plugin_build.DaliInstallError as error:  # two flavours, or files gone: the fix is in the text
        raise PluginError(str(error)) from None
    except ImportError:
        raise PluginError("NVIDIA DALI is not installed. Install exactly one flavour: "
                          "pip install nvidia-dali-cuda120 (nvidia-dali-cuda130 on a CUDA 13 driver)") from None


def _candidates() -> List[str]:
    dirs = []
    if os.environ.get("DALI_RELABEL_PLUGIN_DIR"):
        dirs.append(os.environ["DALI_RELABEL_PLUGIN_DIR"])
    dirs.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_prebuilt"))
    return dirs


def _mismatch(directory: str, identity: Dict, want_cuda: bool) -> Optional[str]:
    """Why the library in ``directory`` must not be loaded, or ``None`` if it fits."""
    manifest_path = os.path.join(directory, plugin_build.MANIFEST_NAME)
    if not os.path.isfile(os.path.join(directory, plugin_build.LIBRARY_NAME)):
        return "no library"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return "no readable manifest"
    for key in ("dali_version", "dali_flavour", "libdali_bytes"):
        if manifest.get(key) != identity[key]:
            return f"built for {key}={manifest.get(key)!r}, running {identity[key]!r}"
    if manifest.get("source_hash") != plugin_build.source_hash():
        return "built from other sources"
    if want_cuda and not manifest.get("cuda"):
        return "built without the CUDA backend, and nvcc is available now"
    return None


def load_plugin(build: Optional[bool] = None) -> Dict:
    """Load the plugin into DALI (idempotent); returns its manifest.

    Args:
        build: compile it if no fitting library exists; default: yes unless
            ``DALI_RELABEL_NO_BUILD=1``.
    """
    if _loaded is not None:
        return _loaded
    identity = _identity()
    import nvidia.dali.plugin_manager as plugin_manager

    want_cuda = plugin_build.find_nvcc() is not None
    rejected = []
    for directory in _candidates() + [cache_dir(identity)]:
        reason = _mismatch(directory, identity, want_cuda)
        if reason is None:
            return _load(plugin_manager, directory)
        if reason != "no library":
            rejected.append(f"{directory}: {reason}")
    if build is None:
        build = os.environ.get("DALI_RELABEL_NO_BUILD", "0") != "1"
    how = ("run `dali-relabel build-plugin` (needs a C++ compiler, CUDA headers, and nvcc for the GPU "
           f"backend), {ELSEWHERE}")
    if not build:
        detail = ("; skipped: " + "; ".join(rejected)) if rejected else ""
        raise PluginError(f"no dali-relabel plugin fits DALI {identity['dali_version']} "
                          f"({identity['dali_flavour']}){detail}. To build it, {how}.")
    target = cache_dir(identity)
    _build_locked(target, identity, want_cuda, how)
    return _load(plugin_manager, target)


def _unwritable_cache(directory: str, error: OSError, identity: Dict) -> PluginError:
    reason = error.strerror or str(error)
    return PluginError(
        f"the plugin must be built for DALI {identity['dali_version']}, but its cache directory {directory} "
        f"cannot be written ({reason}). Set XDG_CACHE_HOME to a writable directory (the plugin is built "
        "into $XDG_CACHE_HOME/dali_relabel/plugin), or set DALI_RELABEL_PLUGIN_DIR to a directory holding "
        "a plugin built for this DALI (`XDG_CACHE_HOME=DIR dali-relabel build-plugin` makes one; use its "
        "printed 'directory').")


def _inside(error: OSError, directory: str) -> bool:
    """Whether ``error`` concerns a path in ``directory`` (not, say, a missing compiler)."""
    names = [n for n in (error.filename, getattr(error, "filename2", None)) if n]
    root = os.path.abspath(directory) + os.sep
    return any(os.path.abspath(os.fspath(n)).startswith(root) for n in names)


def _ensure_writable(directory: str, identity: Dict) -> None:
    """Create ``directory`` and check a file can be made in it; else a :class:`PluginError` saying what
    to set."""
    import tempfile

    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise _unwritable_cache(directory, error, identity) from None


def _build_locked(target: str, identity: Dict, want_cuda: bool, how: str) -> None:
    from filelock import FileLock

    _ensure_writable(os.path.dirname(target), identity)
    with FileLock(target + ".lock"):
        if _mismatch(target, identity, want_cuda) is None:
            return  # another process built it while we waited
        print(f"dali-relabel: building the label-pooling plugin for DALI {identity['dali_version']} "
              f"({identity['dali_flavour']}; {'CPU + CUDA' if want_cuda else 'CPU only'}; once per DALI "
              "version and flavour, about a minute) "
              f"into {target}", file=sys.stderr, flush=True)
        try:
            plugin_build.build_plugin(target)
        except plugin_build.PluginBuildError as error:
            raise PluginError(f"building the plugin failed: {error}\nFix the cause, then {how}.") from None
        except OSError as error:
            if not _inside(error, os.path.dirname(target)):
                raise
            raise _unwritable_cache(os.path.dirname(target), error, identity) from None
        _remove_stale_builds(target)


KEEP_BUILDS = 3  # per DALI version: checkouts of different sources (branches) keep theirs


def _remove_stale_builds(current: str, keep: int = KEEP_BUILDS) -> None:
    """Delete the cached builds of other sources for the same DALI, except the ``keep - 1`` most
    recently built (several checkouts of the project share the cache; a process that already loaded
    a deleted one keeps its mapping, the files are only unlinked)."""
    import glob
    import shutil

    prefix = current.rsplit("-", 1)[0] + "-"
    others = [p for p in glob.glob(prefix + "*") if os.path.isdir(p) and p != current and ".tmp" not in p]
    others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    for path in others[keep - 1:]:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(path + ".lock")


def _load(plugin_manager, directory: str) -> Dict:
    global _loaded
    plugin_manager.load_library(os.path.join(directory, plugin_build.LIBRARY_NAME))
    with open(os.path.join(directory, plugin_build.MANIFEST_NAME)) as f:
        _loaded = dict(json.load(f), directory=directory)
    return _loaded


def require_gpu_backend() -> None:
    """Raise :class:`PluginError` unless the loaded plugin has its CUDA backend."""
    manifest = load_plugin()
    if manifest.get("cuda"):
        return
    message = (f"the dali-relabel plugin in {manifest.get('directory')} was built without its CUDA "
               "backend (nvcc was not found where it was built), so device='gpu' cannot run. Install "
               "the CUDA toolkit here (set CUDA_HOME) and run `dali-relabel build-plugin --force`, "
               f"{ELSEWHERE}. It must be built for DALI {manifest.get('dali_version')} "
               f"({manifest.get('dali_flavour')}).")
    chosen = os.environ.get("DALI_RELABEL_PLUGIN_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(str(manifest.get("directory"))):
        reason = _mismatch(chosen, _identity(), want_cuda=True)
        message += f" DALI_RELABEL_PLUGIN_DIR={chosen} was not used: {reason or 'it fits now; restart'}."
    raise PluginError(message)


# The operators the library registers, by backend ("gpu" only when built with the CUDA backend).
OPERATORS = {"cpu": ("relabel__KeyedUniforms", "relabel__LabelPooling", "relabel__RandomCropWindow",
                     "relabel__ReadFiles", "relabel__SampleDraws", "relabel__SelectRegions"),
             "gpu": ("relabel__LabelPooling",)}


def check_registered() -> Dict:
    """Load the plugin and check that DALI registered its operators for every backend the build has;
    returns the manifest. No pipeline and no GPU are needed, so it is cheap enough for a container's
    HEALTHCHECK (mostly the time to import DALI)."""
    import nvidia.dali.backend as backend

    manifest = load_plugin()
    registered = {"cpu": set(backend.RegisteredCPUOps()), "gpu": set(backend.RegisteredGPUOps())}
    wanted = ("cpu", "gpu") if manifest.get("cuda") else ("cpu",)
    missing = [f"{name} ({kind})" for kind in wanted for name in OPERATORS[kind] if name not in registered[kind]]
    if missing:
        raise PluginError(f"the plugin in {manifest.get('directory')} loaded, but DALI does not know "
                          f"{', '.join(missing)}")
    return manifest


def describe_build(manifest: Dict, cpu_only: bool = False) -> str:
    """Where a build lies and which backends it has (what ``dali-relabel build-plugin`` prints)."""
    directory = manifest.get("directory")
    if manifest.get("cuda"):
        backends = (f"CPU and CUDA backends (CUDA archs {manifest.get('cuda_archs')}, "
                    f"nvcc {manifest.get('nvcc_version') or '?'})")
    elif cpu_only:
        backends = "CPU backend only (--cpu-only)"
    else:
        backends = ("CPU backend only: nvcc was not found (set CUDA_HOME or DALI_RELABEL_NVCC), so "
                    "device='gpu' will not run with this build")
    return (f"dali-relabel plugin for DALI {manifest.get('dali_version')} ({manifest.get('dali_flavour')}) "
            f"built in {directory}\n  backends: {backends}\n  to use it elsewhere (same DALI): copy "
            "the directory and set DALI_RELABEL_PLUGIN_DIR=<its path>")


def rebuild(force: bool = True, with_cuda: Optional[bool] = None, verbose: bool = True) -> Dict:
    """Build the plugin for the running DALI into the cache (``dali-relabel build-plugin``)."""
    identity = _identity()
    target = cache_dir(identity)
    want_cuda = plugin_build.find_nvcc() is not None if with_cuda is None else with_cuda
    if not force and _mismatch(target, identity, want_cuda) is None:
        with open(os.path.join(target, plugin_build.MANIFEST_NAME)) as f:
            return dict(json.load(f), directory=target)
    _ensure_writable(os.path.dirname(target), identity)
    try:
        manifest = plugin_build.build_plugin(target, with_cuda=with_cuda, verbose=verbose)
    except OSError as error:
        if not _inside(error, os.path.dirname(target)):
            raise
        raise _unwritable_cache(os.path.dirname(target), error, identity) from None
    _remove_stale_builds(target)
    return dict(manifest, directory=target)
