"""Data changed or damaged under a running loader (issue 23): a clear error naming the file, and a
process that goes on (no SIGBUS, no hang)."""
import subprocess
import sys

import pytest

from dali_relabel.store import write_store
from helpers import make_jpeg_tree, random_maps

pytest.importorskip("nvidia.dali")

_LOADER_UNDER_A_CHANGING_STORE = """
import sys, shutil
from dali_relabel.config import DataConfig
from dali_relabel.loader import ReLabelLoader
images, store, change, other = sys.argv[1:5]
loader = ReLabelLoader(images, store, batch_size=4, device="cpu",
                       config=DataConfig(image_size=16, num_threads=1, prefetch_queue_depth=1))
batches = iter(loader)
next(batches)
if change == "truncate":
    with open(store, "r+b") as f:
        f.truncate(4096)
else:
    with open(other, "rb") as src, open(store, "r+b") as dst:  # rewritten in place
        dst.write(src.read())
try:
    for _ in batches:
        pass
    print("no error")
except Exception as error:
    print(type(error).__name__, error)
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    relpaths = make_jpeg_tree(root / "images", 2, 200, size=(16, 16))
    labels = [int(p[6:8]) for p in relpaths]
    names = ["class_00", "class_01", "class_02", "class_03"]
    logits, ids = random_maps(len(relpaths), 3, 5, 5, 4, seed=0)
    store = write_store(root / "s.h5", relpaths, logits, ids, 4, labels=labels, class_names=names)
    other = write_store(root / "other.h5", relpaths, logits[::-1].copy(), ids[::-1].copy(), 4, labels=labels,
                        class_names=names)
    return root, str(root / "images"), store, other


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    ("truncate", "was truncated to 4096 bytes while it was read"),
    ("rewrite", "changed while it was read"),
])
def test_a_store_changed_under_a_running_loader_is_a_clear_error(tree, tmp_path, change, message):
    import shutil

    root, images, store, other = tree
    copy = str(tmp_path / "s.h5")
    shutil.copy(store, copy)
    result = subprocess.run([sys.executable, "-c", _LOADER_UNDER_A_CHANGING_STORE, images, copy, change, other],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-3000:]}"
    assert message in result.stdout and copy in result.stdout, result.stdout
