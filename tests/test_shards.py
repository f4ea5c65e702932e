"""Tar shards: writing (balanced, resumable, refusing a store of another tree), reading them through
DALI's webdataset reader with exactly the tree path's crops and targets, ranks, resume, bad shards."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dali_relabel.config import DataConfig
from dali_relabel.shards import ShardError, ShardSet, expand_braces, write_shards
from dali_relabel.store import StoreError
from helpers import make_jpeg_tree

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # writing shards starts processes; reading them runs DALI pipelines

SMALL = dict(image_size=16, num_threads=1, py_num_workers=1, seed=3)


@pytest.fixture(scope="module")
def shard_data(tiny_set, tmp_path_factory):
    """The tiny set written as shards of about 20 kB."""
    root = tmp_path_factory.mktemp("shards")
    shards = write_shards(tiny_set.images, tiny_set.store, root / "shards", shard_bytes=20_000, progress=False)
    return dict(root=root, images=tiny_set.images, store=tiny_set.store, shards=shards)


def _by_row(batches):
    return {row: (image, target) for images, targets, rows in batches
            for row, image, target in zip(rows.tolist(), images, targets)}


def test_written_shards_hold_every_row_once_in_a_mixed_order(shard_data):
    shards = shard_data["shards"]
    assert len(shards.shards) > 3 and shards.num_samples == 24
    with open(os.path.join(shards.directory, "index.json")) as f:
        index = json.load(f)
    assert index["k"] == 3 and index["grid"] == [4, 4] and index["ids_dtype"] == "uint8"
    import tarfile

    rows = []
    for shard in shards.shards:
        with tarfile.open(shards.path(shard["name"])) as tar:
            names = tar.getnames()
        assert len(names) == 5 * shard["samples"]
        rows += [int(n.split(".")[0]) for n in names[::5]]
    assert sorted(rows) == list(range(24))
    # stored in a seeded random order: the first half of the sequence holds rows of every class
    # (rows are sorted by class folder, 6 per class, so in stored-row order it would hold two)
    assert rows != sorted(rows) and len({r // 6 for r in rows[:12]}) == 4


def test_shards_give_the_tree_paths_crops_and_targets(shard_data):
    from dali_relabel.loader import ReLabelLoader
    from dali_relabel.shard_loader import ShardReLabelLoader

    config = DataConfig(**SMALL, color_jitter=0.3, interpolation="random")
    tree = _by_row(ReLabelLoader(shard_data["images"], shard_data["store"], 4, config=config, device="cpu",
                                 return_rows=True))
    shards = _by_row(ShardReLabelLoader(shard_data["shards"], 4, config=config, device="cpu", return_rows=True))
    assert len(tree) == len(shards) == 24
    for row in tree:
        torch.testing.assert_close(tree[row][0], shards[row][0], rtol=0, atol=0)
        torch.testing.assert_close(tree[row][1], shards[row][1], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["authors", "localized"])
def test_cutmix_modes_from_shards(shard_data, mode):
    from dali_relabel.shard_loader import ShardReLabelLoader

    config = DataConfig(**SMALL, cutmix_probability=1.0, cutmix_mode=mode, mixup_alpha=0.5)
    for images, targets in ShardReLabelLoader(shard_data["shards"], 4, config=config, device="cpu"):
        torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))
        assert images.shape == (4, 3, 16, 16)


def test_two_ranks_read_every_sample_once_and_in_step(shard_data):
    from dali_relabel.shard_loader import ShardReLabelLoader, ShardValidationLoader

    config = DataConfig(**SMALL, last_batch="pad")
    rows, counts = [], []
    for rank in range(2):
        loader = ShardReLabelLoader(shard_data["shards"], 6, config=config, device="cpu", rank=rank, world_size=2,
                                    return_rows=True)
        batches = [batch_rows.tolist() for _, _, batch_rows in loader]
        counts.append((len(batches), len(loader)))
        rows += [r for batch in batches for r in batch]
    assert sorted(rows) == list(range(24)) and counts[0] == counts[1]
    seen = []
    for rank in range(2):
        seen += [r for _, _, batch in ShardValidationLoader(shard_data["shards"], 7, config=config, device="cpu",
                                                              rank=rank, world_size=2, return_rows=True)
                 for r in batch.tolist()]
    assert sorted(seen) == list(range(24))


def test_epochs_reorder_and_resume_continues_exactly(shard_data):
    from dali_relabel.shard_loader import ShardReLabelLoader

    config = DataConfig(**SMALL, cutmix_probability=1.0, cutmix_mode="localized")

    def loader():
        return ShardReLabelLoader(shard_data["shards"], 4, config=config, device="cpu", return_rows=True)

    full = loader()
    full.set_epoch(2)
    reference = [(rows.tolist(), targets) for _, targets, rows in full]
    other = loader()
    other.set_epoch(3)
    assert [rows.tolist() for _, _, rows in other] != [rows for rows, _ in reference]
    interrupted = loader()
    interrupted.set_epoch(2)
    batches = iter(interrupted)
    for _ in range(3):
        next(batches)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batch"]) == (2, 3) and state["dali_checkpoint"]
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(reference) - 3
    rest = [(rows.tolist(), targets) for _, targets, rows in resumed]
    assert [rows for rows, _ in rest] == [rows for rows, _ in reference[3:]]
    for (_, a), (_, b) in zip(reference[3:], rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        ShardReLabelLoader(shard_data["shards"], 4, config=config.replace(seed=4), device="cpu").load_state_dict(state)
    with pytest.raises(ValueError, match="data.cutmix_mode: saved 'localized', now 'authors'"):
        ShardReLabelLoader(shard_data["shards"], 4, config=config.replace(cutmix_mode="authors"),
                           device="cpu").load_state_dict(state)


@pytest.mark.parametrize("policy", ["pad", "drop"])
def test_a_two_rank_position_resumes_on_one_rank_and_on_three_reading_every_sample_once(shard_data, policy):
    """Two ranks stop after 2 batches of 3; the merged state continues with 1 rank of 5 and 3 ranks of 2:
    the epoch's unread samples (through index files listing only those), each with its own target."""
    from dali_relabel.loader_state import ResumeError, merge_states
    from dali_relabel.shard_loader import ShardReLabelLoader

    config = DataConfig(**SMALL, last_batch=policy)

    def loader(batch_size, rank=0, world_size=1):
        made = ShardReLabelLoader(shard_data["shards"], batch_size, config=config, device="cpu", rank=rank,
                                  world_size=world_size, return_rows=True)
        made.set_epoch(1)
        return made

    reference = _by_row(loader(4))
    ranks = [loader(3, r, 2) for r in range(2)]
    first = []
    for rank in ranks:
        for i, (images, targets, rows) in enumerate(rank):
            first.append((images, targets, rows))
            if i == 1:
                break
    states = [rank.state_dict() for rank in ranks]
    assert [s["position"] for s in states] == [6, 6] and states[0]["dali_checkpoint"]
    with pytest.raises(ResumeError, match=r"holds the rows of ranks \[1\] of the 2.*merge_states"):
        loader(5).load_state_dict(states[1])
    merged = merge_states(states)
    assert merged["position"] == 12 and merged["seen_ranks"] == [0, 1]
    for shape in ((5, 1), (2, 3)):
        resumed = [loader(shape[0], r, shape[1]) for r in range(shape[1])]
        for rank in resumed:
            rank.load_state_dict(merged)
        assert len({len(rank) for rank in resumed}) == 1
        rest = [batch for rank in resumed for batch in rank]
        seen = _by_row(first + rest)
        rows = [r for _, _, batch in first + rest for r in batch.tolist()]
        assert len(rows) == len(set(rows)), f"a sample read twice on {shape}"
        if policy == "pad":
            assert sorted(rows) == list(range(24))
        else:
            assert len(rows) > 24 - 2 * shape[0] * shape[1]
        for row, (image, target) in seen.items():
            torch.testing.assert_close(image, reference[row][0], rtol=0, atol=0)
            torch.testing.assert_close(target, reference[row][1], rtol=0, atol=0)
        again = merge_states([rank.state_dict() for rank in resumed])
        assert again["epoch"] == 2 and not again["position"]
    same = [loader(3, r, 2) for r in range(2)]  # the same shape from the merged state: DALI's checkpoints
    for rank in same:
        rank.load_state_dict(merged)
    uninterrupted = [loader(3, r, 2) for r in range(2)]
    for rank, reference_rank in zip(same, uninterrupted):
        assert [b.tolist() for _, _, b in rank] == [b.tolist() for _, _, b in reference_rank][2:]
    del ranks, resumed, same, uninterrupted
    import gc

    gc.collect()  # DALI pipelines sit in reference cycles: free their memory before later tests fork


def test_truncated_shard_is_refused_by_name(shard_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_data["shards"].directory, copy)
    victim = copy / shard_data["shards"].shards[2]["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    with pytest.raises(ShardError, match=f"{victim}: .* bytes, but .* were written: the shard is truncated"):
        ShardSet.load(copy)
    os.remove(victim)
    with pytest.raises(ShardError, match="missing"):
        ShardSet.load(copy)


def test_brace_patterns_select_shards(shard_data):
    assert expand_braces("a/s-{008..010}.tar") == ["a/s-008.tar", "a/s-009.tar", "a/s-010.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    directory = shard_data["shards"].directory
    some = ShardSet.load(os.path.join(directory, "shard-{000000..000001}.tar"))
    assert [s["name"] for s in some.shards] == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ShardError, match="not in"):
        ShardSet.load(os.path.join(directory, "shard-{000000..000099}.tar"))


def test_writing_resumes_and_refuses_other_inputs(shard_data, tmp_path):
    out = tmp_path / "again"
    first = write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=20_000, progress=False)
    victim = first.shards[1]["name"]
    reference = (out / victim).read_bytes()
    os.remove(out / victim.replace(".tar", ".idx"))
    mtimes = {s["name"]: os.path.getmtime(out / s["name"]) for s in first.shards}
    again = write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=20_000, progress=False)
    assert (out / victim).read_bytes() == reference, "the same inputs give the same bytes"
    assert all(os.path.getmtime(out / name) == mtime for name, mtime in mtimes.items() if name != victim)
    assert again.num_samples == 24
    with pytest.raises(ShardError, match="other inputs or settings"):
        write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=10_000, progress=False)


def test_a_store_of_another_tree_is_refused(shard_data, tmp_path):
    relpaths = make_jpeg_tree(tmp_path / "other", 2, 3)
    with pytest.raises(StoreError, match="which is not under"):
        write_shards(tmp_path / "other", shard_data["store"], tmp_path / "out", progress=False)
    assert len(relpaths) == 6


def test_shard_command(shard_data, tmp_path):
    from dali_relabel.tools.cli import _parse_bytes, main

    assert _parse_bytes("1GB") == 1 << 30 and _parse_bytes("500MB") == 500 << 20 and _parse_bytes("4096") == 4096
    assert main(["shard", "--images", shard_data["images"], "--store", shard_data["store"], "--out",
                 str(tmp_path / "cli"), "--shard-size", "40kB", "--quiet"]) == 0
    assert ShardSet.load(tmp_path / "cli").num_samples == 24
    assert main(["shard", "--images", str(tmp_path), "--store", shard_data["store"], "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2


def test_validation_shards_without_a_store_keep_the_file_list(shard_data, tmp_path):
    from dali_relabel.shard_loader import ShardReLabelLoader, ShardValidationLoader

    shards = write_shards(shard_data["images"], None, tmp_path / "val", shard_bytes=30_000, progress=False)
    assert not shards.has_maps and shards.relpaths[:2] == ["class_00/img_000.JPEG", "class_00/img_001.JPEG"]
    loader = ShardValidationLoader(tmp_path / "val", 8, config=DataConfig(**SMALL), device="cpu", return_rows=True)
    seen = {}
    for _, labels, rows in loader:
        seen.update(zip(rows.tolist(), labels.tolist()))
    assert sorted(seen) == list(range(24)) and all(seen[r] == r // 6 for r in seen)
    assert loader.images.relpaths == shards.relpaths
    with pytest.raises(ValueError, match="hold no label maps"):
        ShardReLabelLoader(tmp_path / "val", 8, config=DataConfig(**SMALL), device="cpu")


def test_shard_loaders_keep_the_loader_state_rules(shard_data):
    from dali_relabel.loader_state import ResumeError
    from dali_relabel.shard_loader import ShardReLabelLoader, UnknownOrderError

    config = DataConfig(**SMALL)
    loader = ShardReLabelLoader(shard_data["shards"], 4, config=config, device="cpu", rank=1, world_size=3)
    assert len(loader.sampler) == 8 and len(loader) == 2  # ranks read 8 of 24; "drop" keeps 2 x 4
    loader.sampler.set_epoch(2)
    assert loader.state_dict()["epoch"] == 2
    with pytest.raises(UnknownOrderError, match="return_rows=True"):
        list(loader.sampler)
    state = dict(loader.state_dict(), batch=1)
    with pytest.raises(ResumeError, match="resume with the saved settings"):
        ShardReLabelLoader(shard_data["shards"], 4, config=config.replace(seed=4), device="cpu", rank=1,
                           world_size=3).load_state_dict(state)
    with pytest.raises(ResumeError, match="no DALI checkpoint of rank 1's position"):
        loader.load_state_dict(state)


# ------------------------------------------------------------------ untrusted shards (issue 23)
def _copy(shard_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_data["shards"].directory, copy)
    return copy


def _edit_index(directory, edit, rehash=True):
    from dali_relabel.shard_checks import index_digest

    path = directory / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    if rehash:
        index["index_sha256"] = index_digest(index)
    path.write_text(json.dumps(index))


def test_a_rerun_repairs_a_truncated_shard(shard_data, tmp_path):
    """The truncation error says to rerun `dali-relabel shard`; the rerun must write the shard again,
    not record its new size (which switched the check off)."""
    out = tmp_path / "repair"
    first = write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=20_000, progress=False)
    victim = out / first.shards[2]["name"]
    reference = victim.read_bytes()
    victim.write_bytes(reference[:len(reference) // 2])
    with pytest.raises(ShardError, match="truncated"):
        ShardSet.load(out)
    again = write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=20_000, progress=False)
    assert victim.read_bytes() == reference
    assert again.shards == first.shards
    flipped = bytearray(reference)
    flipped[len(flipped) // 3] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(flipped))
    write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=20_000, progress=False)
    assert victim.read_bytes() == reference


def test_changed_bytes_are_found_by_the_content_hash(shard_data, tmp_path):
    copy = _copy(shard_data, tmp_path)
    victim = copy / shard_data["shards"].shards[1]["name"]
    data = bytearray(victim.read_bytes())
    data[3000] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{victim}: bytes 0\.\.\d+ differ from what was written"):
        ShardSet.load(copy, verify="full")
    ShardSet.load(copy, verify="header")  # sizes and indexes alone do not see it


@pytest.mark.parametrize("field", ["grid", "layout", "shards", "k", "num_classes", "index_sha256"])
def test_a_missing_index_field_is_named(shard_data, tmp_path, field):
    copy = _copy(shard_data, tmp_path)
    _edit_index(copy, lambda index: index.pop(field), rehash=False)
    with pytest.raises(ShardError, match=f"index.json: field '{field}' is missing"):
        ShardSet.load(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda index: index.update(grid="4x4"), "field 'grid' must be two non-negative integers"),
    (lambda index: index.update(k=2.5), "field 'k' must be a non-negative integer"),
    (lambda index: index["shards"][0].pop("bytes"), "shard entry 0: field 'bytes' is missing"),
    (lambda index: index["shards"][0].update(samples="4"), "shard entry 0: field 'samples' must be"),
])
def test_mistyped_index_fields_are_named(shard_data, tmp_path, edit, message):
    copy = _copy(shard_data, tmp_path)
    _edit_index(copy, edit)
    with pytest.raises(ShardError, match=message):
        ShardSet.load(copy)


@pytest.mark.parametrize("edit", [
    lambda index: index.update(layout="WH"),
    lambda index: index.update(grid=[index["grid"][0] + 1, index["grid"][1]]),
    lambda index: index.update(ids_dtype="uint16"),
])
def test_an_edited_index_is_refused(shard_data, tmp_path, edit):
    """A changed layout or grid would change every target silently."""
    copy = _copy(shard_data, tmp_path)
    _edit_index(copy, edit, rehash=False)
    with pytest.raises(ShardError, match="index.json: its content differs from what was written"):
        ShardSet.load(copy)


@pytest.mark.parametrize("name", ["../../x.tar", "/etc/x.tar", "sub/x.tar", "..tar"])
def test_shard_names_stay_in_the_shard_directory(shard_data, tmp_path, name):
    copy = _copy(shard_data, tmp_path)
    _edit_index(copy, lambda index: index["shards"][0].update(name=name))
    with pytest.raises(ShardError, match="is not a plain file name inside the shard directory"):
        ShardSet.load(copy)


def test_a_shard_linked_from_outside_is_refused(shard_data, tmp_path):
    copy = _copy(shard_data, tmp_path)
    name = shard_data["shards"].shards[0]["name"]
    outside = tmp_path / "outside.tar"
    os.replace(copy / name, outside)
    os.symlink(outside, copy / name)
    with pytest.raises(ShardError, match=f"{copy / name} leads out of the shard directory"):
        ShardSet.load(copy)


def file_sha256(path):
    from dali_relabel.shard_checks import file_sha256 as digest

    return digest(path)


def _edit_idx(path, line, member, column, value):
    lines = path.read_text().split("\n")
    tokens = lines[line - 1].split()
    tokens[4 * member + column] = value
    lines[line - 1] = " ".join(tokens)
    path.write_text("\n".join(lines))


@pytest.mark.parametrize("member, column, value, message", [
    (0, 2, str(8 << 30), r"member \d+\.jpg at offset \d+, 8589934592 bytes, ends beyond the shard's \d+ bytes"),
    (0, 2, str(1 << 40), "ends beyond the shard's"),
    (1, 2, "0", r"member \d+\.logits at offset \d+, 0 bytes, has the wrong size for its kind \(expected 96 bytes\)"),
    (0, 1, "-512", "member offset is not a number"),
    (0, 1, "100", "starts off a 512-byte tar block"),
    (2, 0, "jpg", r"members \['jpg', 'logits', 'jpg', 'label', 'row'\], expected"),
])
def test_a_damaged_dali_index_is_refused_before_dali_reads_it(shard_data, tmp_path, member, column, value, message):
    """DALI crashed (segfault, std::bad_alloc) or failed mid-epoch ("Actual volume: 0") on these."""
    copy = _copy(shard_data, tmp_path)
    idx = copy / shard_data["shards"].shards[1]["name"].replace(".tar", ".idx")
    _edit_idx(idx, 3, member, column, value)
    with pytest.raises(ShardError, match=rf"{idx}: line 3 \(sample \d+\): .*{message}"):
        ShardSet.load(copy)
    _edit_index(copy, lambda index: index["shards"][1].update(idx_sha256=file_sha256(str(idx))))
    with pytest.raises(ShardError, match=rf"{idx}: line 3 \(sample \d+\): .*{message}"):
        ShardSet.load(copy)  # even with a hash to match (an index edited on purpose)


def test_a_well_formed_but_changed_dali_index_is_refused(shard_data, tmp_path):
    """Two samples' lines swapped: every member is still inside the tar, but not the one written."""
    copy = _copy(shard_data, tmp_path)
    idx = copy / shard_data["shards"].shards[0]["name"].replace(".tar", ".idx")
    lines = idx.read_text().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    idx.write_text("\n".join(lines))
    with pytest.raises(ShardError, match=f"{idx}: differs from the DALI index written"):
        ShardSet.load(copy)


def test_a_malformed_index_line_is_named(shard_data, tmp_path):
    from dali_relabel.shard_checks import parse_index_file

    copy = _copy(shard_data, tmp_path)
    entry = shard_data["shards"].shards[0]
    idx = copy / entry["name"].replace(".tar", ".idx")
    lines = idx.read_text().split("\n")
    lines[2] = lines[2].rsplit(" ", 1)[0]
    idx.write_text("\n".join(lines))
    with pytest.raises(ShardError, match=rf"{idx}: line 3 has 19 fields, expected 20"):
        parse_index_file(str(idx), entry["bytes"], entry["samples"], shard_data["shards"].extensions,
                         shard_data["shards"].member_sizes())


def test_a_second_writer_of_the_same_shards_is_refused(shard_data, tmp_path):
    from dali_relabel.outputs import OutputBusyError, OutputLock

    out = tmp_path / "busy"
    with OutputLock(os.path.abspath(out)):
        with pytest.raises(OutputBusyError, match="is being written by process"):
            write_shards(shard_data["images"], shard_data["store"], out, shard_bytes=20_000, progress=False)
    assert not out.exists()


def _damage_member(path, ext, data_for):
    """Overwrite the data of the first member with extension ``ext`` in a tar, in place."""
    import tarfile

    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith("." + ext))
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(data_for(member.size))
    return member.name.split(".")[0]


@pytest.mark.slow
def test_a_damaged_image_in_a_shard_names_the_shard_and_the_sample(shard_data, tmp_path):
    """DALI's own message names no shard and no sample ("nvImageCodec failure")."""
    from dali_relabel.shard_loader import ShardReLabelLoader

    copy = _copy(shard_data, tmp_path)
    victim = copy / shard_data["shards"].shards[1]["name"]
    key = _damage_member(victim, "jpg", lambda size: b"\x00" * size)
    shards = ShardSet.load(copy, verify="header")
    loader = ShardReLabelLoader(shards, 4, config=DataConfig(**SMALL), device="cpu")
    with pytest.raises(ShardError, match=rf"{victim}: sample {key}: .*not a recognised image format.*content hash "
                                         "differs"):
        for _ in loader:
            pass


_RESTORE_HEAP = """
import sys
from dali_relabel.config import DataConfig
from dali_relabel.shard_loader import ShardReLabelLoader

def heap():
    return sum(int(b, 16) - int(a, 16) for a, b in (line.split()[0].split("-") for line in open("/proc/self/maps")
                                                   if line.rstrip().endswith("[heap]")))

def loader():
    return ShardReLabelLoader(sys.argv[1], 4, config=DataConfig(image_size=16, num_threads=1), device="cpu")

saver = loader()
batches = iter(saver)
next(batches)
state = saver.state_dict()
saver.close()
resumed = loader()
before = heap()
resumed.load_state_dict(state)
next(iter(resumed))
print(heap() - before)
resumed.close()
"""


@pytest.mark.slow
def test_a_resumed_shard_pipeline_commits_no_gigabytes_of_heap(shard_data):
    """Restoring DALI's checkpoint makes the webdataset reader prepare its whole shuffle buffer,
    each output of each sample reserving the reader's ``tensor_init_bytes``: DALI's 1 MB default
    committed 20 GB of heap per resumed pipeline, kept after it went, and later forks of the process
    failed (ENOMEM). Measured in a process of its own (a heap grown earlier would hide it)."""
    pytest.importorskip("nvidia.dali")
    done = subprocess.run([sys.executable, "-c", _RESTORE_HEAP, str(shard_data["shards"].directory)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.split()[-1])
    assert grown < 2 << 30, f"restoring a shard pipeline grew the heap by {grown >> 20} MB"
