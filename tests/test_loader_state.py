"""LoaderState: the position every loader keeps (len, set_epoch, state_dict/load_state_dict, the
sampler and dataset shims), with one set of resume rules, checked on a loader without DALI."""
import pytest

from dali_relabel.errors import DaliRelabelError
from dali_relabel.loader_state import LoaderDataset, LoaderState, ResumeError


class Counting(LoaderState):
    """Passes that yield ``(epoch, batch)``; a checkpoint (when kept) names the batch reached."""

    def __init__(self, batches=5, batch_size=2, seed=0, keeps_checkpoints=False, **position):
        self.batch_size, self.seed, self.keeps_checkpoints = batch_size, seed, keeps_checkpoints
        self.started = []  # (epoch, first, checkpoint) of every pass begun
        super().__init__(batches, **position)

    def _fingerprint(self):
        return {"batch_size": self.batch_size, "seed": self.seed}

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
    assert state == {"epoch": 2, "batch": 2, "dali_checkpoint": None, "batch_size": 2, "seed": 0}
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


def test_other_settings_are_refused_with_the_hint():
    state = Counting(batch_size=2).state_dict()
    with pytest.raises(ResumeError, match=r"other settings \(batch_size: saved 2, now 3\); resume with the "
                                          r"saved settings or start the epoch again"):
        Counting(batch_size=3).load_state_dict(state)
    assert issubclass(ResumeError, DaliRelabelError) and issubclass(ResumeError, ValueError)
    Counting(batch_size=2).load_state_dict({k: v for k, v in state.items() if k != "seed"})  # missing: not compared


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
    with pytest.raises(ResumeError, match="no DALI checkpoint"):
        Counting(keeps_checkpoints=True).load_state_dict(dict(state, dali_checkpoint=None))
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
