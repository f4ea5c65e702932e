"""Compile the label-pooling plugin (``csrc/``) against the DALI installed in this Python.

The CPU backend is compiled with the host C++ compiler; the CUDA backend is added when ``nvcc`` is
found (``$DALI_RELABEL_NVCC``, ``$CUDA_HOME/bin/nvcc`` or ``PATH``), for the architectures in
``$DALI_RELABEL_CUDA_ARCHS`` (default ``80;90``, plus PTX of the last one). Every build writes a
``manifest.json`` beside the library recording the DALI it was built for; the loader
(:mod:`dali_relabel.ops.plugin`) refuses a library whose manifest does not match the running DALI, which
is what turns a DALI upgrade into a rebuild instead of an undefined-symbol crash.

Only the standard library is used here, so ``setup.py`` can import it before anything is installed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Optional, Tuple

LIBRARY_NAME = "libdali_relabel.so"
MANIFEST_NAME = "manifest.json"
BUILD_SCHEMA = 1  # bump when the way the library is built changes
CSRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_CUDA_ARCHS = "80;90"
# The DALI flavours setup.py's extras install, one per CUDA major ("cuda120", "cuda130"). Both put their
# files into the same `nvidia/dali` package directory, so exactly one may be installed.
DALI_FLAVOURS = ("nvidia-dali-cuda120", "nvidia-dali-cuda130")
_DALI_INIT = "nvidia/dali/__init__.py"
_LIBDALI = "nvidia/dali/libdali.so"


try:
    from ..errors import DaliRelabelError
except ImportError:  # loaded alone by setup.py, outside the package
    class DaliRelabelError(Exception):  # type: ignore[no-redef]
        """Stands in for :class:`dali_relabel.errors.DaliRelabelError` when built by setup.py."""


class PluginBuildError(DaliRelabelError, RuntimeError):
    """The plugin could not be compiled; the message says what is missing."""


class DaliInstallError(PluginBuildError):
    """DALI is installed twice (two flavours in one ``nvidia/dali``) or its files are gone; the message
    says which ``pip`` commands fix it."""


def source_hash() -> str:
    """Hash of the plugin sources and of this build recipe."""
    digest = hashlib.sha256(str(BUILD_SCHEMA).encode())
    for path in sorted(glob.glob(os.path.join(CSRC_DIR, "*"))):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _dali_package_dir(path: List[str]) -> Optional[str]:
    """The ``nvidia/dali`` directory that ``import nvidia.dali`` finds on ``path`` (first entry wins)."""
    for entry in path:
        candidate = os.path.join(entry or os.getcwd(), "nvidia", "dali")
        if os.path.isdir(candidate):
            return os.path.realpath(candidate)
    return None


def installed_dali(path: Optional[List[str]] = None) -> Optional[Tuple[str, str]]:
    """``(name, version)`` of the distribution that owns the importable ``nvidia/dali``, or ``None``.

    Found from the distributions' file lists (``RECORD``), without importing DALI, so a damaged install
    is reported instead of failing obscurely. Distributions in a directory shadowed on ``path`` are
    ignored.

    Args:
        path: directories to search, like ``sys.path`` (the default).

    Raises:
        DaliInstallError: two distributions own that directory (pip installs a second flavour over the
            first, and uninstalling either then deletes the files of both), or the owner's files are
            missing (what is left after such an uninstall).
    """
    path = list(sys.path if path is None else path)
    package_dir = _dali_package_dir(path)
    owners: Dict[Tuple[str, str], Dict] = {}
    for dist in _dali_distributions(path):
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if not name.startswith("nvidia-dali"):
            continue
        files = dist.files
        if files is None:  # installed without a RECORD: trust the name
            if re.fullmatch(r"nvidia-dali(-nightly|-weekly)?-cuda\d+", name):
                owners.setdefault((name, dist.version), {"dir": None, "libdali_bytes": None})
            continue
        by_path = {str(f).replace("\\", "/"): f for f in files}
        if _DALI_INIT not in by_path:
            continue  # e.g. nvidia-dali-tf-plugin-*: other files, no conflict
        where = os.path.realpath(os.path.dirname(str(dist.locate_file(by_path[_DALI_INIT]))))
        if package_dir is not None and where != package_dir:
            continue  # shadowed by the copy that is imported
        libdali = by_path.get(_LIBDALI)
        owners.setdefault((name, dist.version), {"dir": where, "libdali_bytes": libdali.size if libdali else None})
    if len(owners) > 1:
        raise DaliInstallError(_two_flavours_message(owners, package_dir))
    if not owners:
        return None
    (name, version), info = next(iter(owners.items()))
    if info["dir"] is not None and not os.path.isfile(os.path.join(info["dir"], "__init__.py")):
        raise DaliInstallError(
            f"{name} {version} is installed, but its files in {info['dir']} are gone (uninstalling a "
            "second DALI flavour deletes the files the two share). Reinstall it:\n"
            f"    pip install --force-reinstall --no-deps {name}=={version}")
    return name, version


def _dali_distributions(path: List[str]) -> list:
    """The installed distributions on ``path`` whose names start with ``nvidia-dali`` (found by listing
    the directories: reading every distribution's metadata takes a noticeable fraction of a second)."""
    import pathlib
    from importlib import metadata

    found = []
    for entry in path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            if re.match(r"nvidia[-_.]dali", name, re.I) and name.endswith((".dist-info", ".egg-info")):
                found.append(metadata.PathDistribution(pathlib.Path(entry or ".", name)))
    return found


def _two_flavours_message(owners: Dict[Tuple[str, str], Dict], package_dir: Optional[str]) -> str:
    names = sorted(owners)
    on_disk = None  # whose libdali.so is there now: the flavour installed last
    libdali = os.path.join(package_dir, "libdali.so") if package_dir else ""
    if libdali and os.path.isfile(libdali):
        size = os.path.getsize(libdali)
        matches = [key for key in names if owners[key]["libdali_bytes"] == size]
        on_disk = matches[0] if len(matches) == 1 else None
    keep = on_disk or names[-1]
    drop = sorted({name for name, version in names if (name, version) != keep})
    listed = " and ".join(f"{name} {version}" for name, version in names)
    now = f" (libdali.so is {on_disk[0]}'s: it was installed last)" if on_disk else ""
    return (f"two DALI flavours are installed: {listed}. Both install the same `nvidia.dali` package "
            f"into {package_dir or 'one directory'}, so its files are a mix{now}, and `pip uninstall` of "
            "either one deletes the files of both. Keep exactly one: uninstall the other, then reinstall "
            "the one you keep, e.g.\n"
            f"    pip uninstall -y {' '.join(drop)} && pip install --force-reinstall --no-deps "
            f"{keep[0]}=={keep[1]}\n"
            "(nvidia-dali-cuda130 on a CUDA 13 driver, nvidia-dali-cuda120 otherwise).")


def dali_identity() -> Dict[str, object]:
    """Version, flavour and library fingerprint of the importable DALI (imports it).

    Raises:
        DaliInstallError: two DALI flavours are installed, or DALI's files are gone (see
            :func:`installed_dali`).
        ImportError: DALI is not installed.
    """
    owner = installed_dali()
    import nvidia.dali as dali
    import nvidia.dali.sysconfig as dali_sysconfig

    flavour = owner[0] if owner else "unknown"
    lib_dir = dali_sysconfig.get_lib_dir()
    libdali = os.path.join(lib_dir, "libdali.so")
    size = os.path.getsize(libdali) if os.path.exists(libdali) else -1
    return {"dali_version": dali.__version__, "dali_flavour": flavour, "libdali_bytes": size,
            "dali_lib_dir": lib_dir}


def find_nvcc() -> Optional[str]:
    """Path to nvcc, or ``None`` (``DALI_RELABEL_CUDA=0`` forces ``None``)."""
    if os.environ.get("DALI_RELABEL_CUDA", "1") == "0":
        return None
    candidates = [os.environ.get("DALI_RELABEL_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def nvcc_version(nvcc: str) -> str:
    """``"13.0"`` from ``nvcc --version`` (empty if it cannot be read)."""
    import re

    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else ""


def cuda_mismatch_warning(flavour: str, version: str) -> str:
    """A warning when nvcc's CUDA major differs from the DALI flavour's (``nvidia-dali-cuda120``)."""
    import re

    match = re.search(r"cuda(\d+)\d$", flavour)
    if not match or not version or version.split(".")[0] == match.group(1):
        return ""
    return (f"dali-relabel: the CUDA backend is built with nvcc {version} for {flavour}; its kernels "
            f"need a driver that supports CUDA {version.split('.')[0]}. On an older driver, point "
            "CUDA_HOME at a matching toolkit and run `dali-relabel build-plugin --force`.")


def find_cuda_include(nvcc: Optional[str]) -> str:
    """A directory with ``cuda_runtime.h`` (DALI's headers include it even for CPU operators)."""
    candidates = []
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    site = sysconfig.get_paths()["purelib"]
    # CUDA runtime wheels (nvidia-cuda-runtime-cu12, the cu13 bundle) ship the headers too.
    candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_runtime.h")):
            return path
    raise PluginBuildError(
        "cuda_runtime.h was not found, and DALI's headers need it even for the CPU operator. Install "
        "the CUDA toolkit (and set CUDA_HOME) or the headers from PyPI: "
        "pip install nvidia-cuda-runtime-cu12")


def _run(cmd: List[str], cwd: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise PluginBuildError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{tail}")


def _cuda_arch_flags() -> List[str]:
    archs = [a.strip() for a in os.environ.get("DALI_RELABEL_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")
             if a.strip()]
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def build_plugin(target_dir: str, with_cuda: Optional[bool] = None, verbose: bool = False) -> Dict:
    """Compile the plugin into ``target_dir`` (atomically); returns the manifest.

    Args:
        target_dir: where ``libdali_relabel.so`` and ``manifest.json`` go.
        with_cuda: build the CUDA backend; ``None`` builds it when nvcc is found.
        verbose: print the compiler commands.
    """
    import nvidia.dali.sysconfig as dali_sysconfig

    nvcc = find_nvcc()
    if with_cuda and not nvcc:
        raise PluginBuildError("the CUDA backend was requested but nvcc was not found "
                               "(set CUDA_HOME or DALI_RELABEL_NVCC)")
    use_cuda = bool(nvcc) if with_cuda is None else with_cuda
    cuda_include = find_cuda_include(nvcc)
    dali_cflags = dali_sysconfig.get_compile_flags()
    dali_lflags = dali_sysconfig.get_link_flags()
    lib_dir = dali_sysconfig.get_lib_dir()
    identity = dali_identity()
    cxx = os.environ.get("CXX", "g++")
    started = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(target_dir)) or ".", exist_ok=True)
    work = tempfile.mkdtemp(prefix="dali_relabel_build_")
    try:
        common = ["-O3", "-DNDEBUG", f"-I{CSRC_DIR}", f"-I{cuda_include}"] + dali_cflags
        commands, objects = [], []
        for source in sorted(glob.glob(os.path.join(CSRC_DIR, "*.cc"))):  # the CPU operators
            obj = os.path.splitext(os.path.basename(source))[0] + ".o"
            commands.append([cxx, "-std=c++20", "-fPIC", "-Wall", "-c", source, "-o", obj] + common)
            objects.append(obj)
        if use_cuda:
            for source in sorted(glob.glob(os.path.join(CSRC_DIR, "*.cu"))):
                obj = os.path.splitext(os.path.basename(source))[0] + "_gpu.o"
                commands.append([nvcc, "-std=c++20", "-Xcompiler", "-fPIC", "--fmad=false", "-c", source,
                                 "-o", obj] + _cuda_arch_flags() + common)
                objects.append(obj)
            link = [nvcc, "-shared", "-o", LIBRARY_NAME] + objects + dali_lflags + [
                "-Xlinker", f"-rpath={lib_dir}", "-cudart", "static"]
        else:
            link = [cxx, "-shared", "-o", LIBRARY_NAME] + objects + dali_lflags + [f"-Wl,-rpath,{lib_dir}"]
        for cmd in commands + [link]:
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            _run(cmd, work)
        version = nvcc_version(nvcc) if use_cuda else ""
        warning = cuda_mismatch_warning(str(identity["dali_flavour"]), version)
        if warning:
            print(warning, file=sys.stderr)
        manifest = dict(identity, source_hash=source_hash(), cuda=use_cuda, nvcc_version=version,
                        cuda_archs=os.environ.get("DALI_RELABEL_CUDA_ARCHS", DEFAULT_CUDA_ARCHS) if use_cuda else "",
                        nvcc=nvcc or "", python=sys.version.split()[0],
                        build_seconds=round(time.time() - started, 1))
        with open(os.path.join(work, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=2)
        staged = target_dir.rstrip("/") + f".tmp{os.getpid()}"
        shutil.rmtree(staged, ignore_errors=True)
        os.makedirs(staged)
        for name in (LIBRARY_NAME, MANIFEST_NAME):
            shutil.copy2(os.path.join(work, name), os.path.join(staged, name))
        if os.path.isdir(target_dir):
            shutil.rmtree(target_dir)
        os.replace(staged, target_dir)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
