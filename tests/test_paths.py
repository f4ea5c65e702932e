"""PathTable: paths as one byte buffer, gathered per batch, confined to the image root."""
import pickle

import numpy as np
import pytest

from dali_relabel.paths import PathTable, UnsafePathError


def test_gather_pads_and_prefixes_a_batch():
    table = PathTable.from_strings(["a/1.jpg", "bb/22.jpg", "ccc/ünï.jpg"])
    assert len(table) == 3 and table[2] == "ccc/ünï.jpg" and table[-1] == table[2]
    assert table.tolist() == ["a/1.jpg", "bb/22.jpg", "ccc/ünï.jpg"]
    matrix, lengths = table.gather([2, 0, 0], prefix=b"/root/")
    assert matrix.dtype == np.uint8 and matrix.shape[0] == 3
    decoded = [bytes(row[:length]).decode() for row, length in zip(matrix, lengths)]
    assert decoded == ["/root/ccc/ünï.jpg", "/root/a/1.jpg", "/root/a/1.jpg"]
    assert not matrix[1, lengths[1]:].any(), "zero padding after each path"
    with pytest.raises(IndexError):
        table[3]


def test_pickles_and_empty_batches():
    table = PathTable.from_strings(["x", "yy"])
    clone = pickle.loads(pickle.dumps(table))
    assert clone.tolist() == ["x", "yy"]
    matrix, lengths = table.gather(np.array([], np.int64), prefix=b"r/")
    assert matrix.shape == (0, 2) and lengths.shape == (0,)


@pytest.mark.parametrize("bad, problem", [("/etc/passwd", "absolute path"), ("../up.jpg", "'..'"),
                                          ("a/../../b.jpg", "'..'"), ("a/..", "'..'"), ("a\0b", "NUL")])
def test_paths_leaving_the_root_are_refused(bad, problem):
    table = PathTable.from_strings(["ok/1.jpg", bad])
    with pytest.raises(UnsafePathError, match=f"row 1 .*{problem}"):
        table.check_confined("where")


def test_dots_inside_names_are_fine():
    PathTable.from_strings(["a/..b.jpg", "a/b../c.jpg", "a/.../d", "..e"]).check_confined("where")
