"""Compile the label-pooling plugin (``csrc/``) against the DALI installed in this Python.

The CPU backend is compiled with the host C++ compiler; the CUDA backend is added when ``nvcc`` is
found (``$DALI_RELABEL_NVCC``, ``$CUDA_HOME/bin/nvcc`` or ``PATH``), for the architectures in
``$DALI_RELABEL_CUDA_ARCHS`` (default ``80;90``, plus PTX of the last one). Every build writes a
``manifest.json`` beside the library recording the DALI it was built for; the loader
(:mod:`dali_relabel.plugin`) refuses a library whose manifest does not match the running DALI, which
is what turns a DALI upgrade into a rebuild instead of an undefined-symbol crash.

Only the standard library is used here, so ``setup.py`` can import it before anything is installed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Dict, List, Optional

LIBRARY_NAME = "libdali_relabel.so"
MANIFEST_NAME = "manifest.json"
BUILD_SCHEMA = 1  # bump when the way the library is built changes
CSRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
DEFAULT_CUDA_ARCHS = "80;90"


class PluginBuildError(RuntimeError):
    """The plugin could not be compiled; the message says what is missing."""


def source_hash() -> str:
    """Hash of the plugin sources and of this build recipe."""
    digest = hashlib.sha256(str(BUILD_SCHEMA).encode())
    for path in sorted(glob.glob(os.path.join(CSRC_DIR, "*"))):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def dali_identity() -> Dict[str, object]:
    """Version, flavour and library fingerprint of the importable DALI (imports it)."""
    import nvidia.dali as dali
    import nvidia.dali.sysconfig as dali_sysconfig
    from importlib import metadata

    flavour = "unknown"
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali") and dist.version == dali.__version__:
            flavour = name
            break
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
