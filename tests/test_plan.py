"""EpochPlan, the sharding core: pure numpy, tested without DALI."""
import numpy as np
import pytest

from dali_relabel.plan import EpochPlan


@pytest.mark.parametrize("n, world, batch", [(42, 2, 8), (100, 3, 7), (10, 4, 3), (5, 8, 1)])
def test_pad_reads_every_sample_once_per_epoch_over_the_ranks(n, world, batch):
    plans = [EpochPlan(n, batch, rank, world, seed=4, last_batch="pad") for rank in range(world)]
    assert len({p.num_batches for p in plans}) == 1, "every rank reads as many batches"
    for epoch in range(3):
        valid_rows = []
        for plan in plans:
            rows, valid = plan.rows(epoch)
            assert len(rows) == len(valid) == plan.num_batches * batch
            valid_rows += rows[valid].tolist()
            assert set(rows[~valid].tolist()) <= set(rows[valid].tolist()) or not valid.any()
        assert sorted(valid_rows) == list(range(n))


def test_drop_gives_full_batches_of_disjoint_rows():
    plans = [EpochPlan(42, 8, rank, 2, seed=1) for rank in range(2)]
    rows = [plan.rows(0)[0] for plan in plans]
    assert [len(r) for r in rows] == [16, 16] and all(plan.rows(0)[1].all() for plan in plans)
    assert not set(rows[0]) & set(rows[1])


def test_order_depends_on_seed_and_epoch_only():
    plan = EpochPlan(1000, 10, seed=3)
    assert np.array_equal(plan.rows(2)[0], EpochPlan(1000, 10, seed=3).rows(2)[0])
    assert not np.array_equal(plan.rows(2)[0], plan.rows(3)[0])
    assert not np.array_equal(plan.rows(2)[0], EpochPlan(1000, 10, seed=4).rows(2)[0])
    assert np.array_equal(EpochPlan(10, 5, shuffle=False).rows(7)[0], np.arange(10))
    both = [EpochPlan(1000, 10, rank, 2, seed=3).rows(5)[0] for rank in range(2)]
    assert np.array_equal(np.sort(np.concatenate(both)), np.arange(1000)), "ranks split one permutation"


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        EpochPlan(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="do not fill one batch"):
        EpochPlan(10, 8, world_size=2)
    with pytest.raises(ValueError, match="last_batch"):
        EpochPlan(10, 2, last_batch="keep")
    assert EpochPlan(10, 8, world_size=2, last_batch="pad").num_batches == 1


@pytest.mark.parametrize("n, world, batch", [(30, 4, 7), (29, 2, 7), (9, 2, 4), (21, 4, 5)])
def test_every_pad_batch_of_every_rank_holds_a_real_sample(n, world, batch):
    """A shard that ends on a batch boundary while others spill into one more batch must not end in
    a batch of padding alone (that rank would take one step fewer: a DDP hang)."""
    seen = []
    for rank in range(world):
        plan = EpochPlan(n, batch, rank, world, seed=2, last_batch="pad")
        rows, valid = plan.rows(0)
        assert valid.reshape(plan.num_batches, batch).any(axis=1).all(), f"rank {rank} has an empty batch"
        seen += rows[valid].tolist()
    assert sorted(seen) == list(range(n))


def _timm_repeat_aug_indices(n, world, rank, repeats, seed, epoch):
    """timm's RepeatAugSampler (and torchvision's RASampler) index logic, written out for a given
    permutation (theirs draws it with torch.randperm; ours with numpy, so only the dealing is compared)."""
    import math

    order = EpochPlan(n, 1, seed=seed).permutation(epoch).tolist()
    indices = [i for i in order for _ in range(repeats)]
    total = int(math.ceil(n * repeats / world)) * world
    indices += indices[:total - len(indices)]
    selected = n // 256 * 256 // world if n >= 256 else n // world
    return indices[rank:total:world][:selected]


@pytest.mark.parametrize("n, world, repeats", [(1000, 1, 3), (1000, 4, 3), (600, 3, 4), (90, 2, 2)])
def test_repeats_deal_copies_as_timm_and_torchvision_do(n, world, repeats):
    for rank in range(world):
        plan = EpochPlan(n, 8, rank, world, seed=2, repeats=repeats)
        rows, valid = plan.rows(5)
        expected = _timm_repeat_aug_indices(n, world, rank, repeats, 2, 5)
        assert len(expected) == plan.samples_per_rank
        usable = plan.num_batches * 8
        assert rows.tolist() == expected[:usable] and valid.all()


def test_repeated_copies_get_their_own_draw_keys():
    plan = EpochPlan(1000, 10, repeats=3, seed=1)
    rows, keys = plan.rows(4)[0], plan.draw_epochs(4)
    assert set(keys.tolist()) == {12, 13, 14}  # epoch 4 * 3 repeats + copy
    pairs = list(zip(rows.tolist(), keys.tolist()))
    assert len(set(pairs)) == len(pairs), "no (row, key) twice: every copy is augmented differently"
    counts = np.bincount(rows, minlength=1000)
    assert counts.max() == 3 and plan.samples_per_rank == 768  # 1000 // 256 * 256
    assert (EpochPlan(1000, 10, seed=1).draw_epochs(4) == 4).all(), "without repeats the key is the epoch"
    other = EpochPlan(1000, 10, repeats=3, seed=1).draw_epochs(5)
    assert not set(other.tolist()) & set(keys.tolist()), "epochs never share keys"


def test_repeats_over_ranks_put_copies_on_different_ranks_and_pad_keeps_keys():
    plans = [EpochPlan(512, 16, rank, 2, seed=0, repeats=2, last_batch="pad") for rank in range(2)]
    first = [set(p.rows(0)[0][:64].tolist()) for p in plans]
    assert len(first[0] & first[1]) > 40, "copies of a sample are dealt to both ranks"
    for plan in plans:
        rows, valid = plan.rows(0)
        assert len(plan.draw_epochs(0)) == len(rows) and valid.sum() == plan.samples_per_rank


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        EpochPlan(100, 10, repeats=0)
