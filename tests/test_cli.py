"""The command line starts light: help and the store tools import neither torch nor DALI."""
import os
import subprocess
import sys

from dali_relabel.store import write_store
from helpers import random_maps

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_and_list_heavy_imports(code: str):
    probe = code + "\nimport sys\nprint(sorted(m for m in ('torch', 'nvidia.dali', 'matplotlib') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_help_imports_neither_torch_nor_dali():
    lines = _run_and_list_heavy_imports(
        "import contextlib, io\nfrom dali_relabel.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    assert lines[-1] == "[]"


def test_info_reads_a_store_without_torch_or_dali(tmp_path):
    logits, ids = random_maps(6, 2, 3, 3, 5, seed=0)
    store = write_store(tmp_path / "s.h5", [f"c/{i}.JPEG" for i in range(6)], logits, ids, num_classes=5)
    lines = _run_and_list_heavy_imports(f"from dali_relabel.cli import main\nassert main(['info', {str(store)!r}, '--json']) == 0")
    assert lines[-1] == "[]"
    assert any('"rows": 6' in line for line in lines)
