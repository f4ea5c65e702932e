"""The command line starts light: help and the store tools import neither torch nor DALI."""
import os
import subprocess
import sys

import pytest

from dali_relabel.store import write_store
from helpers import random_maps

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_and_list_heavy_imports(code: str):
    probe = code + "\nimport sys\nprint(sorted(m for m in ('torch', 'nvidia.dali', 'matplotlib') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


@pytest.mark.slow
def test_help_imports_neither_torch_nor_dali():
    lines = _run_and_list_heavy_imports(
        "import contextlib, io\nfrom dali_relabel.tools.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    assert lines[-1] == "[]"


@pytest.mark.slow
def test_info_reads_a_store_without_torch_or_dali(tmp_path):
    logits, ids = random_maps(6, 2, 3, 3, 5, seed=0)
    store = write_store(tmp_path / "s.h5", [f"c/{i}.JPEG" for i in range(6)], logits, ids, num_classes=5)
    lines = _run_and_list_heavy_imports(f"from dali_relabel.tools.cli import main\nassert main(['info', {str(store)!r}, '--json']) == 0")
    assert lines[-1] == "[]"
    assert any('"rows": 6' in line for line in lines)


def test_a_user_error_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    """Every subcommand shares one handler: the message, named by its command, and no traceback."""
    from dali_relabel.tools.cli import main

    monkeypatch.delenv("DALI_RELABEL_TRACEBACK", raising=False)
    not_a_store = tmp_path / "maps.h5"
    not_a_store.write_bytes(b"this is not HDF5")
    assert main(["info", str(not_a_store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dali-relabel info: ") and str(not_a_store) in err and "Traceback" not in err
    assert main(["show", str(tmp_path / "missing.h5"), "--image-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("dali-relabel show: ")


def test_the_traceback_variable_lets_the_error_through(tmp_path, monkeypatch):
    import pytest

    from dali_relabel.tools.cli import main
    from dali_relabel.store import StoreError

    monkeypatch.setenv("DALI_RELABEL_TRACEBACK", "1")
    (tmp_path / "bad.h5").write_bytes(b"x")
    with pytest.raises(StoreError):
        main(["info", str(tmp_path / "bad.h5")])


def test_interrupt_says_what_was_kept_and_a_bug_is_not_hidden(capsys):
    import argparse

    import pytest

    from dali_relabel.tools.cli import run_command

    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command("convert", interrupted, argparse.Namespace(out="/data/store.h5")) == 130
    assert "/data/store.h5.partial keeps the rows written so far" in capsys.readouterr().err

    def buggy(args):
        raise TypeError("a bug")

    with pytest.raises(TypeError):  # not a message for the user: the traceback is needed
        run_command("info", buggy, argparse.Namespace())
