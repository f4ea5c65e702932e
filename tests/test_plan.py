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


# -- the global order and elastic resume -----------------------------------------------------------
def _read(plans, epoch, batches, start=0, unread=()):
    """``[(row, key)]`` every rank of ``plans`` reads in its first ``batches`` batches from ``start``."""
    seen = []
    for plan in plans:
        rows, valid = plan.rows(epoch, start, unread)
        keys = plan.draw_epochs(epoch, start, unread)
        span = slice(0, batches * plan.batch_size)
        seen += list(zip(rows[span][valid[span]].tolist(), keys[span][valid[span]].tolist()))
    return seen


def _ranks(n, batch, world, **options):
    return [EpochPlan(n, batch, rank, world, seed=7, **options) for rank in range(world)]


@pytest.mark.parametrize("n, world, batch, policy, repeats", [
    (42, 2, 8, "drop", 1), (42, 2, 8, "pad", 1), (100, 3, 7, "pad", 1), (29, 2, 7, "pad", 1),
    (21, 4, 5, "pad", 1), (300, 4, 8, "drop", 3), (300, 2, 16, "pad", 2), (90, 2, 4, "pad", 2)])
def test_after_every_batch_the_read_positions_are_the_global_order_up_to_the_position(n, world, batch, policy,
                                                                                        repeats):
    plans = _ranks(n, batch, world, last_batch=policy, repeats=repeats)
    plan = plans[0]
    rows, keys = plan.sequence(3)
    for k in range(plan.num_batches):
        start, unread = plan.position_after(k)
        read = sorted(_read(plans, 3, k))
        expected = sorted((int(rows[p]), int(3 * repeats + keys[p])) for p in range(start) if p not in unread)
        assert read == expected, f"after {k} batches"
        assert start - len(unread) == len(read), "the global count of samples read"
        if k < plan.num_batches - 1:
            assert (start, unread) == (k * batch * world, ()), "a prefix of the order"
    with pytest.raises(ValueError, match="position after"):
        plan.position_after(plan.num_batches)


def test_the_same_ranks_and_batch_size_continue_exactly_the_uninterrupted_epoch():
    for policy in ("drop", "pad"):
        for plan in _ranks(29, 7, 2, last_batch=policy) + _ranks(300, 8, 3, repeats=3, last_batch=policy):
            full_rows, full_valid = plan.rows(5)
            for k in range(plan.num_batches):
                start, unread = plan.position_after(k)
                rows, valid = plan.rows(5, start, unread)
                assert plan.batches(start, unread) == plan.num_batches - k
                if not unread:  # (padding may repeat other rows: it is never trained on)
                    assert np.array_equal(valid, full_valid[k * plan.batch_size:])
                    assert np.array_equal(rows[valid], full_rows[k * plan.batch_size:][valid])
                    keys = plan.draw_epochs(5, start)
                    assert np.array_equal(keys[valid], plan.draw_epochs(5)[k * plan.batch_size:][valid])


@pytest.mark.parametrize("n, repeats", [(101, 1), (300, 3), (90, 2)])
@pytest.mark.parametrize("before, after", [((2, 8), (1, 8)), ((2, 8), (3, 5)), ((4, 3), (2, 16)), ((1, 5), (4, 2)),
                                           ((3, 4), (5, 1))])
def test_a_resume_on_other_ranks_and_batch_sizes_reads_the_rest_of_the_epoch_exactly_once(n, repeats, before, after):
    """Checkpoint on S ranks after any number of batches, resume on M ranks with another batch size
    (and chain a second resume): with "pad" every position of the epoch is read exactly once, each
    with its own augmentation key; with "drop" none twice, and only the order's tail is left out."""
    (world, batch), (new_world, new_batch) = before, after
    for policy in ("pad", "drop"):
        saved = _ranks(n, batch, world, last_batch=policy, repeats=repeats)
        resumed = _ranks(n, new_batch, new_world, last_batch=policy, repeats=repeats)
        again = _ranks(n, 3, 2, last_batch=policy, repeats=repeats)
        everything = [(int(r), repeats + c) for r in saved[0].permutation(1) for c in range(repeats)]
        for k in range(saved[0].num_batches):
            start, unread = saved[0].position_after(k)
            first = _read(saved, 1, k)
            total = resumed[0].batches(start, unread)
            for j in range(total + 1):  # a second checkpoint inside the resumed pass, then a third shape
                if j < total:
                    second = _read(resumed, 1, j, start, unread)
                    start2, unread2 = resumed[0].position_after(j, start, unread)
                    third = _read(again, 1, again[0].batches(start2, unread2), start2, unread2)
                else:
                    second, third = _read(resumed, 1, total, start, unread), []
                seen = sorted(first + second + third)
                assert len(set(seen)) == len(seen), f"read twice ({policy}, {k} then {j} batches)"
                kept = [plans[0].order_length for plans in (saved, resumed, again)]
                assert set(seen) <= set(everything[:max(kept)]), "past the epoch's order"
                if policy == "pad":  # every position of the epoch read
                    assert set(everything[:min(kept)]) <= set(seen), f"{k} then {j} batches"
                else:  # only the order's tail is left out: less than a batch per rank per resume
                    assert len(seen) >= min(kept) - sum(w * b for w, b in (before, after, (2, 3)))
