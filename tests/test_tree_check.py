"""Store against image tree: the refusals, and the check remembered while the tree is unchanged."""
import os
import time

import numpy as np
import pytest

import dali_relabel.tree_check as tree_check
from dali_relabel.store import LabelStore, StoreError, write_store
from dali_relabel.tree_check import check_store_matches_images
from helpers import make_jpeg_tree, random_maps


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _tree_and_store(root, paths=None, labels=None, num_classes=3, per_class=2):
    relpaths = make_jpeg_tree(root / "images", num_classes, per_class)
    paths = relpaths if paths is None else paths
    logits, ids = random_maps(len(paths), 2, 2, 2, num_classes, seed=1)
    if labels is None:
        labels = [int(p.split("/")[0][-2:]) for p in paths]
    store = write_store(root / "s.h5", paths, logits, ids, num_classes, labels=labels,
                        class_names=[f"class_{c:02d}" for c in range(num_classes)])
    return str(root / "images"), LabelStore(store), relpaths


def _count_listings(monkeypatch):
    calls = []
    original = tree_check.list_images

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(tree_check, "list_images", counting)
    return calls


def test_matching_store_passes_and_is_remembered(tmp_path, monkeypatch):
    root, store, _ = _tree_and_store(tmp_path)
    calls = _count_listings(monkeypatch)
    check_store_matches_images(store, root)
    check_store_matches_images(store, root)
    check_store_matches_images(LabelStore(store.path), root)
    assert len(calls) == 1, "an unchanged tree must not be listed again"
    check_store_matches_images(store, root, cache=False)
    assert len(calls) == 2


def test_an_image_added_later_is_found(tmp_path, monkeypatch):
    root, store, _ = _tree_and_store(tmp_path)
    check_store_matches_images(store, root)
    time.sleep(0.01)  # a distinct folder modification time on coarse file systems
    make_jpeg_tree(tmp_path / "extra", 1, 1)
    os.replace(tmp_path / "extra" / "class_00" / "img_000.JPEG", os.path.join(root, "class_01", "new.JPEG"))
    with pytest.raises(StoreError, match="1 images under .* have no map, first: class_01/new.JPEG"):
        check_store_matches_images(store, root)


def test_an_image_removed_later_is_found(tmp_path):
    root, store, relpaths = _tree_and_store(tmp_path)
    check_store_matches_images(store, root)
    os.remove(os.path.join(root, relpaths[3]))
    with pytest.raises(StoreError, match=f"row 3 refers to {relpaths[3]}, which is not under"):
        check_store_matches_images(store, root)


def test_two_rows_with_one_path_are_refused(tmp_path):
    """Counting is not enough: row 1 repeating row 0's path leaves one image without a map."""
    relpaths = make_jpeg_tree(tmp_path / "images", 2, 2)
    paths = [relpaths[0], relpaths[0]] + relpaths[2:]
    root, store, _ = _tree_and_store(tmp_path, paths=paths, num_classes=2)
    with pytest.raises(StoreError, match=f"rows 0 and 1 both refer to {relpaths[0]}"):
        check_store_matches_images(store, root)


def test_label_of_another_folder_is_refused_without_listing(tmp_path, monkeypatch):
    relpaths = make_jpeg_tree(tmp_path / "images", 3, 2)
    labels = [int(p.split("/")[0][-2:]) for p in relpaths]
    labels[4] = 0
    root, store, _ = _tree_and_store(tmp_path, labels=labels)
    calls = _count_listings(monkeypatch)
    with pytest.raises(StoreError, match=rf"row 4 \({relpaths[4]}\) has label 0 = 'class_00', but lies in "
                                         r"folder 'class_02'"):
        check_store_matches_images(store, root)
    assert calls == []


def test_unknown_labels_and_prefix_names_are_told_apart(tmp_path):
    # 'class_0' is a prefix of 'class_01': the folder must equal the name, not start with it
    relpaths = make_jpeg_tree(tmp_path / "images", 2, 1)
    logits, ids = random_maps(2, 1, 1, 1, 2, seed=0)
    store = LabelStore(write_store(tmp_path / "p.h5", relpaths, logits, ids, 2, labels=[-1, 0],
                                   class_names=["class_0", "class_01"]))
    with pytest.raises(StoreError, match=r"row 1 .* has label 0 = 'class_0', but lies in folder 'class_01'"):
        check_store_matches_images(store, str(tmp_path / "images"))
    store = LabelStore(write_store(tmp_path / "q.h5", relpaths, logits, ids, 2, labels=[-1, -1],
                                   class_names=["class_0", "class_01"]))
    check_store_matches_images(store, str(tmp_path / "images"))


def test_unwritable_cache_still_checks(tmp_path, monkeypatch):
    root, store, relpaths = _tree_and_store(tmp_path)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    calls = _count_listings(monkeypatch)
    check_store_matches_images(store, root)
    check_store_matches_images(store, root)
    assert len(calls) == 2
    os.remove(os.path.join(root, relpaths[0]))
    with pytest.raises(StoreError, match="row 0 refers to"):
        check_store_matches_images(store, root)


def test_a_different_store_for_the_same_root_is_checked_again(tmp_path, monkeypatch):
    root, store, relpaths = _tree_and_store(tmp_path)
    check_store_matches_images(store, root)
    logits, ids = random_maps(len(relpaths), 2, 2, 2, 3, seed=7)
    other = LabelStore(write_store(tmp_path / "other.h5", relpaths[:-1], logits[:-1], ids[:-1], 3,
                                   labels=[int(p.split("/")[0][-2:]) for p in relpaths[:-1]],
                                   class_names=[f"class_{c:02d}" for c in range(3)]))
    with pytest.raises(StoreError, match=f"have no map, first: {relpaths[-1]}"):
        check_store_matches_images(other, root)
    check_store_matches_images(other, root, allow_extra_images=True)
    assert np.asarray(other.labels).shape == (len(relpaths) - 1,)


def test_a_fifo_in_the_tree_is_refused_by_name(tmp_path):
    """A FIFO named like an image would block whoever opens it (issue 23): refused, never opened."""
    root, store, relpaths = _tree_and_store(tmp_path)
    os.remove(os.path.join(root, relpaths[2]))
    os.mkfifo(os.path.join(root, relpaths[2]))
    with pytest.raises(StoreError, match=f"{relpaths[2]} is a FIFO, not a regular file"):
        check_store_matches_images(store, root)


def test_a_socket_or_a_link_to_a_device_in_the_tree_is_refused(tmp_path):
    import socket

    root, store, relpaths = _tree_and_store(tmp_path)
    os.remove(os.path.join(root, relpaths[1]))
    os.symlink("/dev/zero", os.path.join(root, relpaths[1]))
    with pytest.raises(StoreError, match=f"{relpaths[1]} is a character device, not a regular file"):
        check_store_matches_images(store, root)
    os.remove(os.path.join(root, relpaths[1]))
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(root, relpaths[1]))
    server.close()
    with pytest.raises(StoreError, match=f"{relpaths[1]} is a socket, not a regular file"):
        check_store_matches_images(store, root)


def test_a_link_to_a_regular_image_is_accepted(tmp_path):
    root, store, relpaths = _tree_and_store(tmp_path)
    target = tmp_path / "elsewhere.JPEG"
    os.replace(os.path.join(root, relpaths[0]), target)
    os.symlink(target, os.path.join(root, relpaths[0]))
    check_store_matches_images(store, root)


def test_stored_image_sizes_are_compared_with_the_files(tmp_path):
    relpaths = make_jpeg_tree(tmp_path / "images", 2, 3, size=(12, 16))
    logits, ids = random_maps(len(relpaths), 2, 2, 2, 2, seed=1)
    labels = [int(p.split("/")[0][-2:]) for p in relpaths]
    names = ["class_00", "class_01"]
    sizes = np.tile([12, 16], (len(relpaths), 1))
    right = LabelStore(write_store(tmp_path / "right.h5", relpaths, logits, ids, 2, labels=labels,
                                   class_names=names, image_sizes=sizes))
    check_store_matches_images(right, tmp_path / "images")
    unknown = LabelStore(write_store(tmp_path / "unknown.h5", relpaths, logits, ids, 2, labels=labels,
                                     class_names=names))  # (0, 0): not recorded, nothing to compare
    check_store_matches_images(unknown, tmp_path / "images")
    sizes[4] = [16, 12]  # height and width swapped
    wrong = LabelStore(write_store(tmp_path / "wrong.h5", relpaths, logits, ids, 2, labels=labels,
                                   class_names=names, image_sizes=sizes))
    with pytest.raises(StoreError, match=rf"row 4 \({relpaths[4]}\): stored image size 16x12 \(height x width\), "
                                         r"but the file is 12x16"):
        check_store_matches_images(wrong, tmp_path / "images")
