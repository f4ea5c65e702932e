"""Damaged tar shards with ``skip_bad_shards``: a shard truncated before a pass or while the pass reads
it is left out of the pass, named in a warning and counted; every other sample comes exactly once with
its own image and target; ranks stay in step; a state saved in such a pass resumes without it (and
with it once repaired). Without skipping the shard is refused by name."""
import os
import shutil
import tarfile

import pytest
import torch

from dali_relabel.config import DataConfig
from dali_relabel.shards import ShardError, ShardSet

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.slow  # writing shards starts processes; reading them runs DALI pipelines

CONFIG = DataConfig(image_size=16, num_threads=1, py_num_workers=1, seed=3, last_batch="pad")


@pytest.fixture(scope="module")
def shards(tiny_set, tmp_path_factory):
    """The tiny set as shards of 3 samples, written with ``dali-relabel shard``."""
    from dali_relabel.tools.cli import main

    out = tmp_path_factory.mktemp("skip") / "shards"
    assert main(["shard", "--images", str(tiny_set.images), "--store", str(tiny_set.store), "--out", str(out),
                 "--shard-size", "20000", "--quiet"]) == 0
    found = ShardSet.load(out)
    assert len(found.shards) == 8 and found.num_samples == 24
    return found


def _loader(location, batch_size=4, **kwargs):
    from dali_relabel.shard_loader import ShardReLabelLoader

    return ShardReLabelLoader(location, batch_size, config=CONFIG, device="cpu", return_rows=True, **kwargs)


@pytest.fixture(scope="module")
def reference(shards):
    """``{row: (image, target)}`` of epoch 0 from the intact shards."""
    loader = _loader(shards)
    found = _by_row(list(loader))
    loader.close()
    return found


def _by_row(batches):
    rows = [row for _, _, batch in batches for row in batch.tolist()]
    assert len(rows) == len(set(rows)), "a sample came twice"
    return {row: (image, target) for images, targets, batch in batches
            for row, image, target in zip(batch.tolist(), images, targets)}


def _same_samples(batches, reference, rows):
    """The batches hold exactly ``rows``, once each, every one with its reference image and target."""
    found = _by_row(batches)
    assert sorted(found) == sorted(rows)
    for row in rows:
        torch.testing.assert_close(found[row][0], reference[row][0], rtol=0, atol=0)
        torch.testing.assert_close(found[row][1], reference[row][1], rtol=0, atol=0)


def _copy(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards.directory, copy)
    return copy


def _rows_in(path):
    with tarfile.open(path) as tar:
        return {int(name.split(".")[0]) for name in tar.getnames()}


def _truncate(path):
    data = path.read_bytes()
    with open(path, "r+b") as f:  # in place, as a failing copy or disk leaves it
        f.truncate(len(data) // 2)
    return data


def test_a_shard_truncated_before_a_pass_is_refused_or_left_out_and_counted(shards, reference, tmp_path):
    from dali_relabel.shard_loader import ShardValidationLoader

    copy = _copy(shards, tmp_path)
    victim = shards.shards[2]["name"]
    lost = _rows_in(copy / victim)
    strict, skipping = _loader(copy), _loader(copy, skip_bad_shards=True)
    assert len(skipping) == 6
    original = _truncate(copy / victim)
    with pytest.raises(ShardError, match=f"{victim}: .* bytes, but .* were written: the shard is truncated"):
        next(iter(strict))
    with pytest.warns(RuntimeWarning, match=f"{victim}: .* bytes.*left out of the pass over epoch 0 at its start, "
                                            f"{len(lost)} samples not read"):
        batches = list(skipping)
    _same_samples(batches, reference, set(range(24)) - lost)
    assert len(batches) == len(skipping) == -(-(24 - len(lost)) // 4)  # len(): the next pass, as last checked
    assert skipping.skipped_shards == {victim: {"passes": 1, "samples": len(lost),
                                                "problem": skipping.skipped_shards[victim]["problem"]}}
    assert "truncated" in skipping.skipped_shards[victim]["problem"]
    with pytest.warns(RuntimeWarning, match=f"{victim}"):  # every pass checks again
        assert sum(len(rows) for _, _, rows in skipping) == 24 - len(lost)
    assert skipping.skipped_shards[victim]["passes"] == 2

    # a state saved inside the pass resumes without it (and keeps no DALI checkpoint of that reader)
    interrupted = _loader(copy, skip_bad_shards=True)
    with pytest.warns(RuntimeWarning, match=victim):
        first = []
        for batch in interrupted:
            first.append(batch)
            if len(first) == 2:
                break
    state = interrupted.state_dict()
    assert state["dali_checkpoint"] is None and (state["epoch"], state["batch"]) == (0, 2)
    resumed = _loader(copy, skip_bad_shards=True)
    resumed.load_state_dict(state)
    assert len(resumed) == -(-(24 - len(lost) - 8) // 4)  # the shard is found damaged when the loader starts
    with pytest.warns(RuntimeWarning, match=victim):
        rest = list(resumed)
    assert len(rest) == -(-(24 - len(lost) - 8) // 4)
    _same_samples(first + rest, reference, set(range(24)) - lost)

    # repaired: the same state resumes with it, and a pass reads it again
    (copy / victim).write_bytes(original)
    repaired = _loader(copy, skip_bad_shards=True)
    repaired.load_state_dict(state)
    _same_samples(first + list(repaired), reference, set(range(24)))
    assert repaired.skipped_shards == {}
    skipping.set_epoch(0)
    _same_samples(list(skipping), reference, set(range(24)))
    assert skipping.skipped_shards[victim]["passes"] == 2

    _truncate(copy / victim)
    validation = ShardValidationLoader(copy, 5, config=CONFIG, device="cpu", return_rows=True, skip_bad_shards=True)
    with pytest.warns(RuntimeWarning, match=victim):
        assert sorted(r for _, _, rows in validation for r in rows.tolist()) == sorted(set(range(24)) - lost)
    for loader in (strict, skipping, interrupted, resumed, repaired, validation):
        loader.close()


def test_a_shard_truncated_while_the_pass_reads_it_is_left_out_and_the_pass_goes_on(shards, reference, tmp_path):
    copy = _copy(shards, tmp_path)
    loader = _loader(copy, 2, skip_bad_shards=True)
    victim = loader.shard_order(0)[-1]  # read last: far behind the batches scheduled so far
    batches = iter(loader)
    first = [next(batches)]
    _truncate(copy / victim)
    with pytest.warns(RuntimeWarning, match=f"{victim}: .* bytes.*left out of the pass over epoch 0 while reading it"):
        rest = list(batches)
    yielded = {row for _, _, rows in first + rest for row in rows.tolist()}
    lost = set(range(24)) - yielded
    assert lost and lost <= _rows_in(shards.path(victim)), "only the damaged shard's samples are missing"
    _same_samples(first + rest, reference, yielded)  # each once, with its own image and target
    assert loader.skipped_shards[victim]["passes"] == 1 and loader.skipped_shards[victim]["samples"] == len(lost)
    assert len(first + rest) == -(-(24 - len(lost)) // 2)
    loader.close()


def test_ranks_leave_out_the_same_shards_and_stay_in_step(shards, reference, tmp_path):
    copy = _copy(shards, tmp_path)
    victim = shards.shards[5]["name"]
    lost = _rows_in(copy / victim)
    _truncate(copy / victim)
    batches, counts = [], []
    for rank in range(2):
        loader = _loader(copy, skip_bad_shards=True, rank=rank, world_size=2)  # a damaged shard: no refusal
        with pytest.warns(RuntimeWarning, match=victim):
            mine = list(loader)
        counts.append((len(mine), len(loader)))
        batches += mine
        loader.close()
    assert counts[0] == counts[1] == (3, 3)
    _same_samples(batches, reference, set(range(24)) - lost)

    # while reading, on several ranks: named (only this rank sees it; going on would put it out of step)
    fresh = _copy(shards, tmp_path / "fresh")
    loader = _loader(fresh, 2, skip_bad_shards=True, rank=0, world_size=2, shuffle=False)
    running = iter(loader)
    next(running)
    _truncate(fresh / shards.shards[3]["name"])  # rank 0's last shard
    with pytest.raises(ShardError, match=f"{shards.shards[3]['name']}: .* bytes.*would leave rank 0 with fewer "
                                         "batches than the other ranks"):
        list(running)
    loader.close()
