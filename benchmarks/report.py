"""Results of the benchmark suites: machine and versions, summaries of repeats, noise warnings, and
one writer for the JSON + PNG + markdown of every suite.

A result is a dict that starts as :func:`new_result` (what ran, where, with which versions and
arguments) and that each suite fills; :func:`finish` adds the end-of-run load and the warnings,
and :func:`write_outputs` writes ``<out>/<stem>-<date>.json`` and ``.png`` and the table
``<out>/latest-<stem>.md``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from .common import BENCH_DIR, log


# -- where and with what ----------------------------------------------------------------------------
def machine_info() -> dict:
    """Platform, CPU model, cores (all and usable), memory, GPU name and count, load average."""
    info = {"platform": platform.platform(), "machine": platform.machine(), "hostname": platform.node(),
            "cpu_model": None, "cpu_count": os.cpu_count(), "memory_bytes": None, "gpu": None,
            "gpu_count": 0}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable_cores"] = os.cpu_count()
    for path, key, parse in (("/proc/cpuinfo", "model name", lambda v: v.strip()),
                             ("/proc/meminfo", "MemTotal:", lambda v: int(v.split()[0]) * 1024)):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        value = parse(line.split(":", 1)[1])
                        info["cpu_model" if path.endswith("cpuinfo") else "memory_bytes"] = value
                        break
        except OSError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # info only
        pass
    info["load_average"] = load_average()
    return info


def load_average() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def versions() -> dict:
    """Python and library versions, the dali_relabel that was imported, and the git commit
    (:func:`git_state`)."""
    out = {"python": sys.version.split()[0]}
    for name, module in (("dali_relabel", "dali_relabel"), ("torch", "torch"), ("torchvision", "torchvision"),
                         ("dali", "nvidia.dali"), ("numpy", "numpy"), ("h5py", "h5py"), ("pillow", "PIL")):
        try:
            out[name] = getattr(__import__(module, fromlist=["__version__"]), "__version__", None)
        except Exception:
            out[name] = None
    try:
        import dali_relabel

        out["dali_relabel_path"] = os.path.dirname(dali_relabel.__file__)
    except Exception:
        pass
    out.update(git_state())
    return out


#: Set by benchmarks/gpu_check.sh (and usable by anyone running from a copy without ``.git``): the
#: commit the checked tree came from, recorded instead of asking git.
GIT_COMMIT_ENV = "DALI_RELABEL_GIT_COMMIT"
#: ``git_commit`` when neither git nor :data:`GIT_COMMIT_ENV` knows it.
UNKNOWN_COMMIT = "unknown"


def git_state() -> dict:
    """``{"git_commit", "git_dirty"}`` of the checkout the benchmarks run from: the commit from git;
    else from the ``DALI_RELABEL_GIT_COMMIT`` environment variable (``git_dirty`` then ``None``: not
    known); else ``"unknown"`` (a copy of the tree without ``.git``, such as a Docker image or a
    GPU machine's copy). A set variable wins over git."""
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        return {"git_commit": given, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", BENCH_DIR, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(["git", "-C", BENCH_DIR, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        pass
    return {"git_commit": UNKNOWN_COMMIT, "git_dirty": None}


def plugin_info() -> Optional[dict]:
    """The loaded operator plugin's manifest (directory, CUDA backend, build), or ``None``."""
    try:
        from dali_relabel.ops.plugin import load_plugin

        manifest = load_plugin()
    except Exception as error:  # info only; the suites that need it fail on their own
        return {"error": str(error)[:300]}
    keys = ("directory", "cuda", "dali_version", "dali_flavour", "nvcc_version", "cuda_archs", "build_seconds")
    return {key: manifest.get(key) for key in keys}


def jsonable(values: dict) -> dict:
    """The JSON-friendly entries of ``values`` (parsed arguments)."""
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def new_result(benchmark: str, args) -> dict:
    """The common head of a result: name, time, machine (with its load before anything ran),
    versions and arguments."""
    return {"benchmark": benchmark, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": versions(), "arguments": jsonable(vars(args)),
            "started": time.time()}


# -- numbers ----------------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict:
    """``all`` values, ``median``, ``min``, ``max`` and ``spread_pct`` = (max - min) / median."""
    values = [float(v) for v in values]
    median = statistics.median(values)
    return {"all": values, "median": median, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / median if median else None}


def noise_warnings(result: dict, spreads: Dict[str, Optional[float]], spread_limit: float = 20.0) -> List[str]:
    """Reasons to distrust a run: a busy machine (1-minute load average above a quarter of the usable
    cores when the run started; at the end it includes the benchmark's own load, so that one is only
    recorded) or repeats that spread more than ``spread_limit`` % of their median."""
    found = []
    cores = result["machine"].get("usable_cores") or result["machine"].get("cpu_count") or 1
    load = (result["machine"].get("load_average") or [0])[0]
    if load > 0.25 * cores:
        found.append(f"load average {load:.2f} on {cores} cores when the run started: the machine was busy")
    for name, spread in spreads.items():
        if spread is not None and spread > spread_limit:
            found.append(f"{name}: repeats spread {spread:.0f} % of the median")
    return found


def finish(result: dict, spreads: Dict[str, Optional[float]], spread_limit: float = 20.0) -> dict:
    """Add the load average at the end, the wall time and the noise warnings."""
    result["load_average_end"] = load_average()
    result["wall_seconds"] = round(time.time() - result.pop("started", time.time()), 1)
    result["warnings"] = noise_warnings(result, spreads, spread_limit)
    return result


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


# -- markdown ---------------------------------------------------------------------------------------
def header_lines(result: dict, title: str) -> List[str]:
    """Title, machine and versions lines of a markdown report."""
    m, v = result["machine"], result["versions"]
    gib = (m.get("memory_bytes") or 0) / 2**30
    commit = ""
    if v.get("git_commit") and v["git_commit"] != UNKNOWN_COMMIT:
        commit = f" ({v['git_commit'][:10]}{', dirty' if v.get('git_dirty') else ''})"
    return [f"# {title}, {result['created'][:10]}", "",
            f"Machine: {m.get('cpu_model')}, {m.get('usable_cores')} usable cores, {gib:.0f} GiB"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + "; load average at start "
            + ", ".join(f"{x:.2f}" for x in m.get("load_average") or []) + ".",
            f"Versions: python {v.get('python')}, torch {v.get('torch')}, DALI {v.get('dali')}, "
            f"dali-relabel {v.get('dali_relabel')}{commit}.", ""]


def warning_lines(result: dict) -> List[str]:
    if not result.get("warnings"):
        return []
    return ["**Noisy run:** " + "; ".join(result["warnings"]) + ".", ""]


# -- files ------------------------------------------------------------------------------------------
def write_outputs(result: dict, out_dir: str, stem: str, plot: Callable[[dict, str], None],
                  markdown: Callable[[dict], str]) -> dict:
    """Write ``<stem>-<date>.json``, ``<stem>-<date>.png`` (drawn by ``plot``) and ``latest-<stem>.md``
    (from ``markdown``) into ``out_dir``; print the table; return ``result`` with its ``files``."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{stem}-{datetime.date.today().isoformat()}")
    result["files"] = {"json": base + ".json", "png": base + ".png",
                       "markdown": os.path.join(out_dir, f"latest-{stem}.md")}
    plot(result, result["files"]["png"])
    table = markdown(result)
    with open(result["files"]["markdown"], "w") as f:
        f.write(table)
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=2)
    print(table)
    log(f"wrote {result['files']['json']}, {result['files']['png']} and {result['files']['markdown']}")
    return result


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Every benchmark chart is written the same way: tight layout, 110 dpi, the figure closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
