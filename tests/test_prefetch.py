"""PrefetchingSource: batches made ahead on a thread are exactly the batches the source would give
when DALI asks, and nothing else."""
import threading

import numpy as np
import pytest

from dali_relabel.mixing import CutMixSpec
from dali_relabel.paths import PathTable
from dali_relabel.plan import EpochPlan
from dali_relabel.prefetch import PrefetchingSource
from dali_relabel.sources import BatchSource, EpochControl

NUM_ROWS, BATCH = 40, 8  # 5 batches an epoch


class Info:
    def __init__(self, iteration, epoch_idx=0):
        self.iteration, self.epoch_idx = iteration, epoch_idx


class RecordingSource(BatchSource):
    """A BatchSource that notes which batches it made, on which thread; ``fail_at`` raises there."""

    def __init__(self, *args, fail_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.made, self.threads, self.fail_at = [], set(), fail_at

    def produce(self, epoch, batch, mixing):
        self.made.append((epoch, batch, mixing))
        self.threads.add(threading.get_ident())
        if batch == self.fail_at:
            raise ValueError(f"broken batch {batch}")
        return super().produce(epoch, batch, mixing)


@pytest.fixture
def control():
    control = EpochControl()
    yield control
    control.close()


def make_source(control, cls=BatchSource, **kwargs):
    paths = PathTable.from_strings([f"class{r % 3}/img{r}.jpg" for r in range(NUM_ROWS)])
    return cls("/data", EpochPlan(NUM_ROWS, BATCH, seed=4), control, paths=paths,
               labels=np.arange(NUM_ROWS) % 3, epochs=True,
               cutmix=CutMixSpec(probability=1.0, alpha=1.0, image_size=16, seed=1), **kwargs)


def assert_same_batch(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_every_batch_equals_the_direct_call_and_the_epoch_ends_with_stop_iteration(control):
    direct, wrapped = make_source(control), make_source(control, cls=RecordingSource)
    prefetching = PrefetchingSource(wrapped, depth=2)
    for dali_epoch, (epoch, first) in enumerate([(0, 0), (1, 2), (0, 0)]):
        control.begin(dali_epoch, epoch, first, 5)
        for iteration in range(5 - first):
            assert_same_batch(prefetching(Info(iteration, dali_epoch)), direct(Info(iteration, dali_epoch)))
        with pytest.raises(StopIteration):
            prefetching(Info(5 - first, dali_epoch))
    assert wrapped.threads and threading.get_ident() not in wrapped.threads, "batches were made on the caller's thread"
    expected = [(0, b, True) for b in range(5)] + [(1, b, True) for b in range(2, 5)] + [(0, b, True) for b in range(5)]
    assert wrapped.made == expected, "each batch made once per pass, none past the end"


def test_batches_are_made_ahead_of_the_call(control):
    source = make_source(control, cls=RecordingSource)
    prefetching = PrefetchingSource(source, depth=2)
    control.begin(0, 3, 0, 5)
    prefetching(Info(0))
    prefetching._ahead[(3, 2, True)].result(timeout=10)  # the helper thread worked through its queue
    assert source.made == [(3, 0, True), (3, 1, True), (3, 2, True)]


def test_a_pass_stopped_early_never_hands_out_the_batches_made_ahead(control):
    source = make_source(control, cls=RecordingSource)
    prefetching = PrefetchingSource(source, depth=2)
    control.begin(0, 0, 0, 5)
    prefetching(Info(0))
    control.stop(0, 1)  # the loader abandons the pass after batch 0: batches 1 and 2 were made ahead
    with pytest.raises(StopIteration):
        prefetching(Info(1))


def test_mixing_switched_off_between_passes_is_obeyed(control):
    direct = make_source(control)
    prefetching = PrefetchingSource(make_source(control), depth=2)
    control.begin(0, 2, 0, 5, mixing=True)
    mixed = dict(zip(direct.names, prefetching(Info(0, 0))))
    assert mixed["mix_box"].any()
    control.begin(1, 2, 0, 5, mixing=False)
    plain = dict(zip(direct.names, prefetching(Info(0, 1))))
    assert not plain["mix_box"].any(), "a batch made for the mixing pass was reused"
    np.testing.assert_array_equal(plain["rows"], mixed["rows"])


def test_an_error_reaches_the_call_for_its_own_batch(control):
    prefetching = PrefetchingSource(make_source(control, cls=RecordingSource, fail_at=2), depth=2)
    control.begin(0, 0, 0, 5)
    prefetching(Info(0))
    prefetching(Info(1))  # batch 2 failed ahead of time: not this call's business
    with pytest.raises(ValueError, match="broken batch 2"):
        prefetching(Info(2))
