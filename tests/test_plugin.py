"""The plugin loader: only a library built for the running DALI is loaded; otherwise a clear way out.

Nothing here assumes which DALI flavour or version is installed: "another" flavour or version is
derived from the running one, so the suite passes under nvidia-dali-cuda120 and nvidia-dali-cuda130.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("nvidia.dali")

from dali_relabel.tools import cli  # noqa: E402

from dali_relabel.ops import plugin, plugin_build


def _other_flavour(identity):
    """A DALI flavour that is not the running one."""
    return next(f for f in plugin_build.DALI_FLAVOURS if f != identity["dali_flavour"])


def _other_version(identity):
    """A DALI version that is not the running one."""
    return "1.0.0" if identity["dali_version"] != "1.0.0" else "1.0.1"


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


def test_the_running_flavour_is_found():
    import re

    assert re.fullmatch(r"nvidia-dali(-nightly|-weekly)?-cuda\d+", plugin_build.dali_identity()["dali_flavour"])


def test_a_build_for_another_dali_or_other_sources_is_rejected(tmp_path):
    identity = plugin_build.dali_identity()
    version, flavour = _other_version(identity), _other_flavour(identity)
    assert plugin._mismatch(_fake_build(tmp_path / "ok"), identity, want_cuda=False) is None
    other = _fake_build(tmp_path / "old", dali_version=version)
    assert f"dali_version={version!r}" in plugin._mismatch(other, identity, want_cuda=False)
    other = _fake_build(tmp_path / "flavour", dali_flavour=flavour)
    assert (f"built for dali_flavour={flavour!r}, running {identity['dali_flavour']!r}"
            == plugin._mismatch(other, identity, want_cuda=False))
    stale = _fake_build(tmp_path / "stale", source_hash="0000")
    assert plugin._mismatch(stale, identity, want_cuda=False) == "built from other sources"
    cpu_only = _fake_build(tmp_path / "cpu")
    assert "without the CUDA backend" in plugin._mismatch(cpu_only, identity, want_cuda=True)
    assert plugin._mismatch(tmp_path / "missing", identity, want_cuda=False) == "no library"


@pytest.mark.slow
def test_no_fitting_build_and_no_building_gives_instructions(tmp_path):
    version = _other_version(plugin_build.dali_identity())
    _fake_build(tmp_path / "old", dali_version=version)
    env = dict(os.environ, DALI_RELABEL_PLUGIN_DIR=str(tmp_path / "old"), DALI_RELABEL_NO_BUILD="1",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    code = "from dali_relabel.ops.plugin import load_plugin\nload_plugin()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no dali-relabel plugin fits DALI" in done.stderr
    assert f"dali_version={version!r}" in done.stderr and "dali-relabel build-plugin" in done.stderr
    assert "undefined symbol" not in done.stderr


def test_stale_builds_of_the_same_dali_are_pruned_keeping_the_newest(tmp_path):
    current = str(tmp_path / "2.4.0-cuda120-new")
    names = ("2.4.0-cuda120-oldest", "2.4.0-cuda120-older", "2.4.0-cuda120-recent", "2.4.0-cuda120-new",
             "2.3.0-cuda120-keep", "2.4.0-cuda130-keep")
    for age, name in enumerate(reversed(names)):
        os.makedirs(tmp_path / name)
        (tmp_path / (name + ".lock")).write_text("")
        os.utime(tmp_path / name, (1e9 - age * 100, 1e9 - age * 100))  # later in the list: older
    plugin._remove_stale_builds(current, keep=3)  # another checkout's two latest builds stay
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["2.3.0-cuda120-keep", "2.3.0-cuda120-keep.lock", "2.4.0-cuda120-new", "2.4.0-cuda120-new.lock",
         "2.4.0-cuda120-recent", "2.4.0-cuda120-recent.lock", "2.4.0-cuda120-older", "2.4.0-cuda120-older.lock",
         "2.4.0-cuda130-keep", "2.4.0-cuda130-keep.lock"])
    plugin._remove_stale_builds(current, keep=1)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("2.4.0-cuda120")) == [
        "2.4.0-cuda120-new", "2.4.0-cuda120-new.lock"]


# ------------------------------------------------------------------------------------------------
# Switching flavours in one environment (uninstall one, install the other): the cache is keyed by
# flavour, so each flavour finds only its own build; faked here by changing the flavour in the identity.

@pytest.fixture
def flavour_cache(tmp_path, monkeypatch):
    """(running identity, the same DALI as the other flavour), with an empty plugin cache in tmp_path,
    no other place to look, and DALI's load_library recording instead of loading."""
    running = plugin_build.dali_identity()
    other = dict(running, dali_flavour=_other_flavour(running))  # even the same libdali size
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(plugin, "_candidates", lambda: [])
    monkeypatch.setattr(plugin, "_loaded", None)
    loaded = []
    import nvidia.dali.plugin_manager as plugin_manager

    monkeypatch.setattr(plugin_manager, "load_library", loaded.append)
    return running, other, loaded


def _pretend(monkeypatch, identity):
    monkeypatch.setattr(plugin_build, "dali_identity", lambda: identity)
    monkeypatch.setattr(plugin, "_loaded", None)


def test_each_flavour_loads_its_own_cached_build(flavour_cache, monkeypatch):
    running, other, loaded = flavour_cache
    assert plugin.cache_dir(running) != plugin.cache_dir(other)
    for identity in (running, other):
        _fake_build(plugin.cache_dir(identity), dali_flavour=identity["dali_flavour"], cuda=True)
    for identity in (running, other, running):  # switch there and back: no rebuild either way
        _pretend(monkeypatch, identity)
        manifest = plugin.load_plugin(build=False)
        assert manifest["directory"] == plugin.cache_dir(identity)
        assert manifest["dali_flavour"] == identity["dali_flavour"]
    assert loaded == [os.path.join(plugin.cache_dir(i), plugin_build.LIBRARY_NAME) for i in (running, other, running)]


@pytest.mark.parametrize("direction", ["to the other flavour", "back to the running flavour"])
def test_a_build_for_one_flavour_is_never_loaded_for_the_other(flavour_cache, monkeypatch, tmp_path, direction):
    running, other, loaded = flavour_cache
    built_for, now = (running, other) if direction == "to the other flavour" else (other, running)
    _fake_build(plugin.cache_dir(built_for), dali_flavour=built_for["dali_flavour"], cuda=True)
    assert plugin._mismatch(plugin.cache_dir(built_for), now, want_cuda=False) == (
        f"built for dali_flavour={built_for['dali_flavour']!r}, running {now['dali_flavour']!r}")
    _pretend(monkeypatch, now)
    with pytest.raises(plugin.PluginError, match="dali-relabel build-plugin") as error:
        plugin.load_plugin(build=False)
    assert now["dali_flavour"] in str(error.value) and loaded == []
    # The same build, named explicitly (DALI_RELABEL_PLUGIN_DIR), is refused and the reason is given.
    monkeypatch.setattr(plugin, "_candidates", lambda: [plugin.cache_dir(built_for)])
    with pytest.raises(plugin.PluginError, match=f"dali_flavour={built_for['dali_flavour']!r}"):
        plugin.load_plugin(build=False)
    assert loaded == []


@pytest.mark.slow
def test_after_switching_flavours_no_building_gives_instructions(tmp_path):
    """A real process with the other flavour's identity, DALI_RELABEL_NO_BUILD=1 and only the running
    flavour's build in its cache: the instructions, and the build (not a library) is never opened."""
    running = plugin_build.dali_identity()
    env = dict(os.environ, DALI_RELABEL_NO_BUILD="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("DALI_RELABEL_PLUGIN_DIR", None)
    code = textwrap.dedent(f"""
        from dali_relabel.ops import plugin, plugin_build
        real = plugin_build.dali_identity
        plugin_build.dali_identity = lambda: dict(real(), dali_flavour={_other_flavour(running)!r})
        plugin._candidates = lambda: []
        built = plugin.cache_dir(real())
        import json, os
        os.makedirs(built)
        manifest = dict(real(), source_hash=plugin_build.source_hash(), cuda=True)
        json.dump(manifest, open(os.path.join(built, plugin_build.MANIFEST_NAME), "w"))
        open(os.path.join(built, plugin_build.LIBRARY_NAME), "wb").write(b"not a library")
        plugin.load_plugin()
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert (f"no dali-relabel plugin fits DALI {running['dali_version']} ({_other_flavour(running)})"
            in done.stderr), done.stderr
    assert "run `dali-relabel build-plugin`" in done.stderr
    assert "ELF" not in done.stderr and "undefined symbol" not in done.stderr


# ------------------------------------------------------------------------------------------------
# Both flavours installed at once: pip puts both into one nvidia/dali directory. Faked with a
# site directory holding a fake nvidia/dali and the distributions' metadata.

def _fake_site(root, installs, libdali_of=None, files=True, extra_files=()):
    """A site directory where each (name, version) in ``installs`` was pip-installed into nvidia/dali,
    in that order (so libdali.so is the last one's, unless ``libdali_of`` names another)."""
    package = root / "nvidia" / "dali"
    package.mkdir(parents=True)
    (root / "nvidia" / "__init__.py").write_text("")
    sizes = {name: 1000 + 10 * i for i, (name, _) in enumerate(installs)}
    if files:
        (package / "__init__.py").write_text("__version__ = '2.4.0'\n")
        (package / "libdali.so").write_bytes(b"\0" * sizes[libdali_of or installs[-1][0]])
    for name, version in installs:
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        record = ["nvidia/__init__.py,,0", "nvidia/dali/__init__.py,,22", f"nvidia/dali/libdali.so,,{sizes[name]}",
                  f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
        (info / "RECORD").write_text("\n".join(record + list(extra_files)) + "\n")
    return str(root)


CU12, CU13 = plugin_build.DALI_FLAVOURS


def test_one_installed_flavour_is_found(tmp_path):
    site = _fake_site(tmp_path, [(CU13, "2.4.0")])
    assert plugin_build.installed_dali([site]) == (CU13, "2.4.0")
    assert plugin_build.installed_dali([str(tmp_path / "empty")]) is None


@pytest.mark.parametrize("last", [CU12, CU13])
def test_two_installed_flavours_are_an_error_naming_the_fix(tmp_path, last):
    first = CU13 if last == CU12 else CU12
    site = _fake_site(tmp_path, [(first, "2.4.0"), (last, "2.4.0")])
    with pytest.raises(plugin_build.DaliInstallError) as error:
        plugin_build.installed_dali([site])
    message = str(error.value)
    assert f"two DALI flavours are installed: {CU12} 2.4.0 and {CU13} 2.4.0" in message
    assert f"libdali.so is {last}'s" in message  # the files there now: the one installed last
    # Uninstalling one deletes the files both share, so the one kept is reinstalled.
    assert f"pip uninstall -y {first} && pip install --force-reinstall --no-deps {last}==2.4.0" in message


def test_two_flavours_of_different_versions_are_an_error_too(tmp_path):
    site = _fake_site(tmp_path, [(CU12, "2.3.0"), (CU13, "2.4.0")], libdali_of=CU12)
    with pytest.raises(plugin_build.DaliInstallError,
                       match=f"pip uninstall -y {CU13} && pip install --force-reinstall --no-deps {CU12}==2.3.0"):
        plugin_build.installed_dali([site])


def test_a_flavour_whose_files_were_deleted_is_an_error_naming_the_fix(tmp_path):
    """What `pip uninstall` of one of two installed flavours leaves: the other, without its files."""
    site = _fake_site(tmp_path, [(CU13, "2.4.0")], files=False)
    with pytest.raises(plugin_build.DaliInstallError,
                       match=f"(?s)its files in .* are gone.*pip install --force-reinstall --no-deps {CU13}==2.4.0"):
        plugin_build.installed_dali([site])


def test_a_shadowed_dali_and_dali_add_ons_are_no_conflict(tmp_path):
    first = _fake_site(tmp_path / "a", [(CU13, "2.4.0")])
    shadowed = _fake_site(tmp_path / "b", [(CU12, "2.4.0")])  # later on the path: never imported
    assert plugin_build.installed_dali([first, shadowed]) == (CU13, "2.4.0")
    plugin_dir = tmp_path / "a" / "nvidia_dali_tf_plugin_cuda130-2.4.0.dist-info"  # other files
    plugin_dir.mkdir()
    (plugin_dir / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-dali-tf-plugin-cuda130\nVersion: 2.4.0\n")
    (plugin_dir / "RECORD").write_text("nvidia/dali_tf_plugin/__init__.py,,0\n")
    assert plugin_build.installed_dali([first]) == (CU13, "2.4.0")


def test_loading_or_building_with_two_flavours_installed_says_what_to_do(tmp_path, monkeypatch, capsys):
    site = _fake_site(tmp_path, [(CU12, "2.4.0"), (CU13, "2.4.0")])
    real = plugin_build.installed_dali
    monkeypatch.setattr(plugin_build, "installed_dali", lambda path=None: real([site]))
    monkeypatch.setattr(plugin, "_loaded", None)
    with pytest.raises(plugin.PluginError, match="(?s)two DALI flavours are installed.*pip uninstall -y"):
        plugin.load_plugin()
    assert cli.main(["build-plugin"]) == 2
    assert "two DALI flavours are installed" in capsys.readouterr().err


@pytest.mark.slow
def test_build_plugin_cpu_only_into_a_fresh_directory(tmp_path):
    if not shutil.which(os.environ.get("CXX", "g++")):
        pytest.skip("no C++ compiler")
    manifest = plugin_build.build_plugin(str(tmp_path / "build"), with_cuda=False)
    assert manifest["cuda"] is False and manifest["dali_version"] == plugin_build.dali_identity()["dali_version"]
    assert os.path.getsize(tmp_path / "build" / plugin_build.LIBRARY_NAME) > 10_000


@pytest.mark.slow
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
from dali_relabel.ops import plugin
from dali_relabel.tools.cli import main

try:
    plugin.load_plugin()
    print("LOADED without a cache")
except plugin.PluginError as error:
    print("PluginError:", error)
print("build-plugin exit code", main(["build-plugin"]), flush=True)
os.environ["DALI_RELABEL_PLUGIN_DIR"] = sys.argv[1]
print("LOADED", plugin.load_plugin()["directory"])
"""


@pytest.mark.slow
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


def test_a_build_without_cuda_says_how_to_bring_one_from_elsewhere(tmp_path, monkeypatch):
    """A GPU machine without nvcc builds the CPU backend only; device='gpu' must then say both ways
    out: install nvcc, or point DALI_RELABEL_PLUGIN_DIR at a build made where nvcc is."""
    identity = plugin_build.dali_identity()
    cpu_build = dict(identity, source_hash=plugin_build.source_hash(), cuda=False,
                     directory=str(tmp_path / "cache"))
    monkeypatch.setattr(plugin, "_loaded", cpu_build)  # as if load_plugin() had loaded it
    monkeypatch.delenv("DALI_RELABEL_PLUGIN_DIR", raising=False)
    with pytest.raises(plugin.PluginError) as error:
        plugin.require_gpu_backend()
    message = str(error.value)
    assert "without its CUDA backend" in message and str(tmp_path / "cache") in message
    assert "dali-relabel build-plugin --force" in message and "CUDA_HOME" in message
    assert "DALI_RELABEL_PLUGIN_DIR" in message and identity["dali_version"] in message
    # A DALI_RELABEL_PLUGIN_DIR that was skipped is named, with the reason.
    monkeypatch.setenv("DALI_RELABEL_PLUGIN_DIR", str(_fake_build(tmp_path / "old", dali_version="2.3.0", cuda=True)))
    with pytest.raises(plugin.PluginError, match=r"DALI_RELABEL_PLUGIN_DIR=.*old was not used: built for "
                                                 r"dali_version='2\.3\.0'"):
        plugin.require_gpu_backend()
    monkeypatch.setattr(plugin, "_loaded", dict(cpu_build, cuda=True))
    plugin.require_gpu_backend()


def test_build_plugin_prints_where_and_which_backends(monkeypatch, capsys):
    from dali_relabel.tools import cli

    built = dict(plugin_build.dali_identity(), cuda=True, cuda_archs="80;90", nvcc_version="12.6",
                 directory="/somewhere/plugin")
    monkeypatch.setattr(plugin, "rebuild", lambda **kwargs: built)
    assert cli.main(["build-plugin"]) == 0
    out = capsys.readouterr().out
    assert "built in /somewhere/plugin" in out and "CPU and CUDA backends (CUDA archs 80;90" in out
    assert "DALI_RELABEL_PLUGIN_DIR" in out
    monkeypatch.setattr(plugin, "rebuild", lambda **kwargs: dict(built, cuda=False))
    assert cli.main(["build-plugin"]) == 0
    assert "CPU backend only: nvcc was not found" in capsys.readouterr().out
    assert cli.main(["build-plugin", "--cpu-only"]) == 0
    assert "CPU backend only (--cpu-only)" in capsys.readouterr().out


@pytest.mark.slow
def test_check_registered_finds_the_operators_in_dali():
    """What the image's HEALTHCHECK runs: the library is loaded and DALI knows its operators."""
    manifest = plugin.check_registered()
    import nvidia.dali.backend as backend

    assert "relabel__LabelPooling" in backend.RegisteredCPUOps()
    if manifest["cuda"]:
        assert "relabel__LabelPooling" in backend.RegisteredGPUOps()


def test_check_registered_knows_every_operator_the_sources_register():
    import glob
    import re

    found = {"cpu": set(), "gpu": set()}
    for path in glob.glob(os.path.join(plugin_build.CSRC_DIR, "*.c[cu]")):
        with open(path) as f:
            for name, device in re.findall(r"DALI_REGISTER_OPERATOR\((\w+),[^;]*::dali::(CPU|GPU)\)", f.read()):
                found[device.lower()].add(name)
    assert found == {kind: set(names) for kind, names in plugin.OPERATORS.items()}
