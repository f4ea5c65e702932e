"""The plugin loader: only a library built for the running DALI is loaded; otherwise a clear way out."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("nvidia.dali")

from dali_relabel import plugin, plugin_build  # noqa: E402


def _fake_build(directory, **changes):
    os.makedirs(directory, exist_ok=True)
    identity = plugin_build.dali_identity()
    manifest = dict(identity, source_hash=plugin_build.source_hash(), cuda=False)
    manifest.update(changes)
    with open(os.path.join(directory, plugin_build.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(directory, plugin_build.LIBRARY_NAME), "wb") as f:
        f.write(b"not a library")  # must never be dlopen-ed
    return directory


def test_a_build_for_another_dali_or_other_sources_is_rejected(tmp_path):
    identity = plugin_build.dali_identity()
    assert plugin._mismatch(_fake_build(tmp_path / "ok"), identity, want_cuda=False) is None
    other = _fake_build(tmp_path / "old", dali_version="2.3.0")
    assert "dali_version='2.3.0'" in plugin._mismatch(other, identity, want_cuda=False)
    flavour = _fake_build(tmp_path / "flavour", dali_flavour="nvidia-dali-cuda130")
    assert "dali_flavour" in plugin._mismatch(flavour, identity, want_cuda=False)
    stale = _fake_build(tmp_path / "stale", source_hash="0000")
    assert plugin._mismatch(stale, identity, want_cuda=False) == "built from other sources"
    cpu_only = _fake_build(tmp_path / "cpu")
    assert "without the CUDA backend" in plugin._mismatch(cpu_only, identity, want_cuda=True)
    assert plugin._mismatch(tmp_path / "missing", identity, want_cuda=False) == "no library"


def test_no_fitting_build_and_no_building_gives_instructions(tmp_path):
    _fake_build(tmp_path / "old", dali_version="2.3.0")
    env = dict(os.environ, DALI_RELABEL_PLUGIN_DIR=str(tmp_path / "old"), DALI_RELABEL_NO_BUILD="1",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = "from dali_relabel.plugin import load_plugin\nload_plugin()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no dali-relabel plugin fits DALI" in done.stderr
    assert "dali_version='2.3.0'" in done.stderr and "dali-relabel build-plugin" in done.stderr
    assert "undefined symbol" not in done.stderr


def test_stale_builds_of_the_same_dali_are_pruned(tmp_path):
    current = str(tmp_path / "2.4.0-cuda120-new")
    for name in ("2.4.0-cuda120-old", "2.4.0-cuda120-new", "2.3.0-cuda120-keep"):
        os.makedirs(tmp_path / name)
        (tmp_path / (name + ".lock")).write_text("")
    plugin._remove_stale_builds(current)
    assert sorted(os.listdir(tmp_path)) == ["2.3.0-cuda120-keep", "2.3.0-cuda120-keep.lock",
                                            "2.4.0-cuda120-new", "2.4.0-cuda120-new.lock"]


@pytest.mark.slow
def test_build_plugin_cpu_only_into_a_fresh_directory(tmp_path):
    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("no C++ compiler")
    manifest = plugin_build.build_plugin(str(tmp_path / "build"), with_cuda=False)
    assert manifest["cuda"] is False and manifest["dali_version"] == plugin_build.dali_identity()["dali_version"]
    assert os.path.getsize(tmp_path / "build" / plugin_build.LIBRARY_NAME) > 10_000


def test_cuda_backend_is_compiled_where_nvcc_exists():
    """CI machines have nvcc but no GPU: the CUDA backend must still be compiled there."""
    if plugin_build.find_nvcc() is None:
        pytest.skip("no nvcc on this machine")
    manifest = plugin.load_plugin()
    assert manifest["cuda"] is True and "90" in manifest["cuda_archs"]


def test_cuda_toolkit_newer_than_the_dali_flavour_is_pointed_out():
    warning = plugin_build.cuda_mismatch_warning("nvidia-dali-cuda120", "13.0")
    assert "nvcc 13.0" in warning and "driver that supports CUDA 13" in warning
    assert plugin_build.cuda_mismatch_warning("nvidia-dali-cuda130", "13.0") == ""
    assert plugin_build.cuda_mismatch_warning("nvidia-dali-cuda120", "12.6") == ""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_UNWRITABLE_HOME = """
import os, sys
from dali_relabel import plugin
from dali_relabel.cli import main

try:
    plugin.load_plugin()
    print("LOADED without a cache")
except plugin.PluginError as error:
    print("PluginError:", error)
print("build-plugin exit code", main(["build-plugin"]), flush=True)
os.environ["DALI_RELABEL_PLUGIN_DIR"] = sys.argv[1]
print("LOADED", plugin.load_plugin()["directory"])
"""


def test_unwritable_home_names_the_directory_and_the_variables(tmp_path):
    """A home that cannot be written (read-only here: a file, so that root cannot write it either) used
    to end in a raw OSError from load_plugin(), the loaders and build-plugin; a fitting build in a
    readable place must still load."""
    fitting = plugin.load_plugin()["directory"]  # built into the cache if needed
    if os.path.samefile(os.path.dirname(fitting), os.path.join(os.path.dirname(plugin.__file__))):
        pytest.skip("a prebuilt plugin fits: the cache is never written")
    home = tmp_path / "home"
    home.write_text("not a directory")
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "DALI_RELABEL_PLUGIN_DIR", "DALI_RELABEL_NO_BUILD")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _UNWRITABLE_HOME, fitting], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cache = os.path.join(str(home), ".cache", "dali_relabel", "plugin")
    error = next(line for line in done.stdout.splitlines() if line.startswith("PluginError:"))
    assert f"cache directory {cache} cannot be written" in error
    assert "XDG_CACHE_HOME" in error and "DALI_RELABEL_PLUGIN_DIR" in error
    assert "build-plugin exit code 2" in done.stdout
    assert f"cache directory {cache} cannot be written" in done.stderr and "Traceback" not in done.stderr
    assert f"LOADED {fitting}" in done.stdout


def test_read_only_file_system_is_a_plugin_error(tmp_path, monkeypatch):
    import errno

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(plugin, "_loaded", None)
    monkeypatch.delenv("DALI_RELABEL_PLUGIN_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "makedirs", read_only)
    if plugin._mismatch(os.path.join(os.path.dirname(plugin.__file__), "_prebuilt"),
                        plugin_build.dali_identity(), plugin_build.find_nvcc() is not None) is None:
        pytest.skip("a prebuilt plugin fits: the cache is never written")
    with pytest.raises(plugin.PluginError, match=r"cache directory .*cache/dali_relabel/plugin cannot be written "
                                                 r"\(Read-only file system\)\. Set XDG_CACHE_HOME .* set "
                                                 r"DALI_RELABEL_PLUGIN_DIR"):
        plugin.load_plugin(build=True)
    with pytest.raises(plugin.PluginError, match="Read-only file system"):
        plugin.rebuild(force=True)
