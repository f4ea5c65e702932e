"""LoaderState: the position every loader keeps (len, set_epoch, state_dict/load_state_dict, the
sampler and dataset shims), with one set of resume rules, checked on a loader without DALI."""
import pytest

import numpy as np

from dali_relabel.errors import DaliRelabelError
from dali_relabel.loader_state import (LoaderDataset, LoaderState, PlannedState, ResumeError, epoch_start_state,
                                       merge_states, pack_rows, unpack_rows)
from dali_relabel.plan import EpochPlan


class Counting(LoaderState):
    """Passes that yield ``(epoch, batch)``; a checkpoint (when kept) names the batch reached."""

    def __init__(self, batches=5, batch_size=2, seed=0, keeps_checkpoints=False, **position):
        self.batch_size, self.seed, self.keeps_checkpoints = batch_size, seed, keeps_checkpoints
        self.started = []  # (epoch, first, checkpoint) of every pass begun
        super().__init__(batches, **position)

    def _fingerprint(self):
        return {"seed": self.seed}

    @property
    def samples_per_rank(self):
        return self.batches_per_epoch * self.batch_size

    def epoch_rows(self, epoch):
        return [100 * epoch + i for i in range(self.samples_per_rank)]

    def _pass_checkpoint(self, current):
        return f"at {current.epoch}/{current.first + current.consumed}"

    def __iter__(self):
        current = self._next_pass()
        self.started.append((current.epoch, current.first, current.checkpoint))
        while current.first + current.consumed < self.batches_per_epoch:
            if self._pass is not current:
                return
            current.consumed += 1
            yield current.epoch, current.first + current.consumed - 1
        current.finished, self._pass = True, None


def test_a_pass_reads_the_set_epoch_and_the_next_pass_the_one_after():
    loader = Counting()
    assert len(loader) == 5 and list(loader) == [(0, b) for b in range(5)]
    loader.set_epoch(7)
    assert [e for e, _ in loader] == [7] * 5
    assert loader.state_dict()["epoch"] == 8


def test_a_resumed_position_yields_the_rest_and_setting_its_epoch_keeps_it():
    loader = Counting(start_epoch=3, resume_batch=2)
    loader.set_epoch(3)  # a training loop sets the epoch it resumes
    assert len(loader) == 3 and list(loader) == [(3, 2), (3, 3), (3, 4)]
    assert len(loader) == 5, "the epoch after a resumed one is whole again"
    assert (Counting(start_epoch=3, resume_batch=5).epoch, len(Counting(start_epoch=3, resume_batch=5))) == (4, 5)
    with pytest.raises(ValueError, match="resume_batch 6 is outside the epoch's 5 batches"):
        Counting(resume_batch=6)


def test_state_of_a_running_pass_resumes_exactly_there():
    loader = Counting()
    loader.set_epoch(2)
    batches = iter(loader)
    seen = [next(batches) for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batch": 2, "position": 0, "unread": [], "dali_checkpoint": None, "world_size": 1,
                     "batch_size": 2, "rank": 0, "seed": 0}
    resumed = Counting()
    resumed.load_state_dict(state)
    assert seen + list(resumed) == [(2, b) for b in range(5)]
    end = dict(state, batch=5)  # saved after the last batch: the next epoch's start
    resumed.load_state_dict(end)
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batch"], len(resumed)) == (3, 0, 5)


def test_loading_a_state_stops_the_running_pass():
    loader = Counting()
    batches = iter(loader)
    next(batches)
    loader.load_state_dict({"epoch": 4, "batch": 1})  # an older state without a checkpoint entry
    assert list(batches) == [], "the stopped pass yields nothing more"
    assert list(loader) == [(4, b) for b in range(1, 5)]


def test_other_settings_are_refused_inside_an_epoch_with_the_way_to_restart_it():
    state = dict(Counting(seed=1).state_dict(), epoch=3, batch=2)
    with pytest.raises(ResumeError, match=r"cannot continue epoch 3 at batch 2 with other data settings \(seed: "
                                          r"saved 1, now 2\).*resume with the saved settings, or start the epoch "
                                          r"again: load_state_dict\(state, restart_epoch=True\), or train.py "
                                          r"--resume-restart-epoch"):
        Counting(seed=2).load_state_dict(state)
    assert issubclass(ResumeError, DaliRelabelError) and issubclass(ResumeError, ValueError)
    Counting(seed=2).load_state_dict({k: v for k, v in state.items() if k != "seed"})  # missing: not compared
    restarted = Counting(seed=2)
    restarted.load_state_dict(state, restart_epoch=True)  # the way the message names: the epoch from its start
    assert list(restarted) == [(3, b) for b in range(5)]
    boundary = Counting(seed=2, batch_size=3)
    boundary.load_state_dict(epoch_start_state(state, 4))  # at an epoch's start any setting may change
    assert list(boundary)[0] == (4, 0)
    with pytest.raises(ResumeError, match="another shape"):  # a loader without a global position
        Counting(seed=1, batch_size=3).load_state_dict(state)


def test_a_checkpoint_keeping_loader_saves_and_needs_its_checkpoint():
    loader = Counting(keeps_checkpoints=True)
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"], state["dali_checkpoint"]) == (0, 2, "at 0/2")
    resumed = Counting(keeps_checkpoints=True)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["dali_checkpoint"] == "at 0/2", "not started: the saved checkpoint stands"
    assert list(resumed)[0] == (0, 2) and resumed.started == [(0, 2, "at 0/2")]
    with pytest.raises(ResumeError, match="no DALI checkpoint of rank 0's position"):
        Counting(keeps_checkpoints=True).load_state_dict(dict(state, dali_checkpoint=None))
    merged = merge_states([state])  # a merged state keeps every rank's checkpoint
    assert merged["dali_checkpoints"] == ["at 0/2"] and merged["dali_checkpoint"] is None
    again = Counting(keeps_checkpoints=True)
    again.load_state_dict(merged)
    assert again.started == [] and list(again)[0] == (0, 2) and again.started == [(0, 2, "at 0/2")]
    fresh = Counting(keeps_checkpoints=True)
    fresh.load_state_dict(dict(state, batch=0, dali_checkpoint="stale"))  # an epoch's start needs none
    assert fresh.state_dict()["dali_checkpoint"] is None
    fresh.load_state_dict(state)
    fresh.set_epoch(5)
    assert fresh.state_dict()["dali_checkpoint"] is None, "another epoch starts afresh"


def test_the_sampler_and_dataset_shims():
    loader = Counting(batches=2, batch_size=3)
    loader.sampler.set_epoch(4)  # as timm and torchvision call it
    assert loader.epoch == 4 and len(loader.sampler) == 6
    assert list(loader.sampler) == [400, 401, 402, 403, 404, 405]
    assert loader.batch_sampler is None
    dataset = LoaderDataset("/data", ["a", "b"], 10)
    assert len(dataset) == 10 and dataset.class_to_idx == {"a": 0, "b": 1}


def test_every_loader_shares_the_one_set_of_rules():
    pytest.importorskip("nvidia.dali")
    from dali_relabel.loader import ReLabelLoader, ValidationLoader
    from dali_relabel.passes import PipelineBatches
    from dali_relabel.shard_loader import ShardReLabelLoader, ShardValidationLoader

    for loader in (PipelineBatches, ReLabelLoader, ValidationLoader, ShardReLabelLoader, ShardValidationLoader):
        for name in ("state_dict", "load_state_dict", "set_epoch", "__len__"):
            assert getattr(loader, name) is getattr(LoaderState, name), f"{loader.__name__}.{name}"


# -- elastic resume: the global position of a plan, on fake tree loaders (no DALI) ----------------------
class Planned(PlannedState):
    """A tree loader without DALI: each batch is the list of this rank's valid rows the plan deals."""

    def __init__(self, n=45, batch_size=4, rank=0, world_size=1, seed=0, last_batch="pad", data=None, **position):
        self.data = data or {"image_size": 16, "targets": "relabel"}
        super().__init__(EpochPlan(n, batch_size, rank, world_size, seed=seed, last_batch=last_batch), **position)

    def _data_fingerprint(self):
        return {"data": dict(self.data)}

    def __iter__(self):
        current = self._next_pass()
        rows, valid = self.plan.rows(current.epoch, current.start.position, current.start.unread)
        size = self.plan.batch_size
        while current.consumed < current.total:
            if self._pass is not current:
                return
            span = slice(current.consumed * size, (current.consumed + 1) * size)
            current.consumed += 1
            yield rows[span][valid[span]].tolist()
        current.finished, self._pass = True, None


def _job(world, batch, **options):
    return [Planned(batch_size=batch, rank=r, world_size=world, **options) for r in range(world)]


def _steps(loaders, steps=None):
    """Rows the ranks of a DDP job read in ``steps`` steps (all of the pass without), and the job's
    passes (still running)."""
    passes = [iter(loader) for loader in loaders]
    total = len(loaders[0]) if steps is None else steps
    return [row for _ in range(total) for p in passes for row in next(p)], passes


@pytest.mark.parametrize("policy", ["pad", "drop"])
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_three_reading_the_rest_once(policy):
    for steps in range(len(_job(2, 4, last_batch=policy)[0])):
        job = _job(2, 4, last_batch=policy)
        for loader in job:
            loader.set_epoch(6)
        first, _ = _steps(job, steps)
        states = [loader.state_dict() for loader in job]
        assert states[0] == states[1] or states[0] == dict(states[1], rank=0), "every rank knows the global position"
        assert states[0]["position"] - len(states[0]["unread"]) == len(first) == steps * 4 * 2 - \
            (len(first) < steps * 8) * (steps * 8 - len(first))
        for world, batch in ((1, 3), (3, 5), (2, 4)):
            resumed = _job(world, batch, last_batch=policy)
            for loader in resumed:
                loader.load_state_dict(states[0])
                loader.set_epoch(loader.state_dict()["epoch"])  # as a loop does: the position stays
            assert len({len(loader) for loader in resumed}) == 1
            if resumed[0].epoch == 7:  # "drop": less than a batch per rank was left
                assert policy == "drop" and 45 - len(first) < world * batch * 2
                continue
            rest, _ = _steps(resumed)
            seen = first + rest
            assert len(seen) == len(set(seen)), f"a sample read twice ({steps} steps, then {world} x {batch})"
            if policy == "pad":
                assert sorted(seen) == list(range(45)), "an epoch missed samples"
            if (world, batch) == (2, 4):  # the same shape: exactly the uninterrupted epoch's batches
                full = _job(2, 4, last_batch=policy)
                for loader in full:
                    loader.set_epoch(6)
                assert rest == _steps(full)[0][len(first):]
            assert all(loader.state_dict()["epoch"] == 7 for loader in resumed)


def test_resumes_chain_over_shapes_and_the_position_is_global():
    job = _job(3, 2)
    first, _ = _steps(job, 3)
    state = job[1].state_dict()  # any rank's state is the global position
    assert (state["epoch"], state["batch"], state["position"], state["unread"]) == (0, 3, 18, [])
    middle = _job(2, 5)
    for loader in middle:
        loader.load_state_dict(state)
    assert middle[0].state_dict()["batch"] == 1, "numbered in this shape's batches"
    second, _ = _steps(middle, 1)
    state = merge_states([loader.state_dict() for loader in middle])
    last = _job(1, 7)
    last[0].load_state_dict(state)
    rest, _ = _steps(last)
    assert sorted(first + second + rest) == list(range(45))


def test_the_position_before_a_padded_last_batch_keeps_the_samples_moved_into_it():
    """29 samples, 2 ranks of 7: rank 1's 14 samples end on a batch boundary, so its last sample moves
    into the last batch; a checkpoint before that batch lists it as unread."""
    job = _job(2, 7, n=29)
    first, _ = _steps(job, 2)
    state = job[0].state_dict()
    assert state["position"] == 28 and len(state["unread"]) == 1 and len(first) == 27
    for world, batch in ((1, 16), (4, 1)):
        resumed = _job(world, batch, n=29)
        for loader in resumed:
            loader.load_state_dict(state)
        rest, _ = _steps(resumed)
        assert sorted(first + rest) == list(range(29))


def test_a_state_at_the_end_of_an_epoch_is_the_next_epoch_on_any_shape():
    job = _job(2, 4)
    _steps(job)
    state = job[0].state_dict()
    assert (state["epoch"], state["batch"], state["position"]) == (1, 0, 0)
    other = Planned(batch_size=16, world_size=3)
    other.load_state_dict(state)
    assert (other.epoch, len(other)) == (1, 1)


def test_other_data_inside_an_epoch_is_refused_naming_it_and_the_boundary_accepts_it():
    job = _job(1, 4)
    _steps(job, 2)
    state = job[0].state_dict()
    changed = Planned(data={"image_size": 32, "targets": "original"})
    with pytest.raises(ResumeError, match=r"data.image_size: saved 16, now 32, data.targets: saved 'relabel', "
                                          r"now 'original'"):
        changed.load_state_dict(state)
    with pytest.raises(ResumeError, match=r"seed: saved 0, now 1"):
        Planned(seed=1).load_state_dict(state)
    with pytest.raises(ResumeError, match=r"num_samples: saved 45, now 44"):
        Planned(n=44).load_state_dict(state)
    changed.load_state_dict(state, restart_epoch=True)
    assert len(changed) == changed.batches_per_epoch and changed.epoch == 0
    changed.load_state_dict(epoch_start_state(state, 1))
    assert changed.epoch == 1


def test_merging_refuses_ranks_at_different_positions_and_joins_seen_rows():
    job = _job(2, 4)
    passes = [iter(loader) for loader in job]
    next(passes[0])  # rank 0 stepped, rank 1 did not: not a DDP checkpoint
    with pytest.raises(ResumeError, match="different positions"):
        merge_states([loader.state_dict() for loader in job])
    a, b = np.zeros(20, bool), np.zeros(20, bool)
    a[[1, 5]], b[[2, 19]] = True, True
    a[7] = True  # rank 0 yielded one more (a partial last batch): positions differ per rank
    states = [{"epoch": 1, "batch": 1, "world_size": 2, "rank": r, "num_samples": 20, "seen": pack_rows(m),
               "seen_ranks": [r], "dali_checkpoint": f"c{r}", "position": int(m.sum())}
              for r, m in enumerate((a, b))]
    merged = merge_states(states[::-1])
    assert unpack_rows(merged["seen"], 20).nonzero()[0].tolist() == [1, 2, 5, 7, 19]
    assert merged["seen_ranks"] == [0, 1] and merged["position"] == 5
    assert merged["dali_checkpoints"] == ["c0", "c1"] and merged["rank"] is None


def test_a_state_saved_before_the_global_position_existed_still_resumes():
    """Older states held the batch and the shape that saved it (batch_size, world_size in their
    settings): the position is the plan's after that many batches."""
    job = _job(2, 4)
    first, _ = _steps(job, 3)
    old = {"epoch": 0, "batch": 3, "dali_checkpoint": None, "batch_size": 4, "world_size": 2, "rank": 0,
           "num_samples": 45, "seed": 0, "shuffle": True, "last_batch": "pad"}
    resumed = Planned(batch_size=6)
    resumed.load_state_dict(old)
    assert resumed.state_dict()["position"] == 24
    rest = [row for batch in resumed for row in batch]
    assert sorted(first + rest) == list(range(45))
