"""No stall at epoch ends (dali_relabel.lookahead): the next pass's first batches are made before the
current pass ends, and a pass never gets a batch made ahead for another position or mixing switch."""
import numpy as np
import pytest
import torch

from dali_relabel.config import DataConfig
from dali_relabel.lookahead import Stream, locate
from dali_relabel.mixing import CutMixSpec
from dali_relabel.paths import PathTable
from dali_relabel.plan import EpochPlan
from dali_relabel.prefetch import PrefetchingSource
from dali_relabel.sources import FOREVER, BatchSource, EpochControl

NUM_ROWS, BATCH = 40, 8  # 5 batches an epoch


class Info:
    def __init__(self, iteration, epoch_idx=0):
        self.iteration, self.epoch_idx = iteration, epoch_idx


@pytest.fixture
def control():
    control = EpochControl()
    yield control
    control.close()


def _source(control):
    paths = PathTable.from_strings([f"class{r % 3}/img{r}.jpg" for r in range(NUM_ROWS)])
    return BatchSource("/data", EpochPlan(NUM_ROWS, BATCH, seed=4), control, paths=paths,
                       labels=np.arange(NUM_ROWS) % 3, epochs=True,
                       cutmix=CutMixSpec(probability=1.0, alpha=1.0, image_size=16, seed=1))


# -- positions and streams (no DALI) -------------------------------------------------------------
def test_positions_run_on_into_the_following_epochs():
    assert locate(3, 0, 5) == (3, 0)
    assert locate(3, 4, 5) == (3, 4)
    assert locate(3, 5, 5) == (4, 0)
    assert locate(3, 12, 5) == (5, 2)


def test_a_stream_is_continued_only_by_the_pass_that_starts_where_it_stands():
    stream = Stream(epoch=2, first=3, mixing=True, batches_per_epoch=5)
    stream.taken = 2  # the pass over epoch 2 from batch 3 took its 2 batches
    assert stream.next_batch() == (3, 0)
    assert stream.continues(3, 0, True)
    assert not stream.continues(4, 0, True), "set_epoch chose another epoch"
    assert not stream.continues(3, 2, True), "a resumed position elsewhere"
    assert not stream.continues(3, 0, False), "the mixing switch changed and the batches depend on it"
    assert stream.continues(3, 0, False, mixing_matters=False)


def test_a_stream_inside_a_resumed_pass_is_continued_by_no_other_pass():
    """A pass resumed on another shape (its own global position) is no whole epoch's batches: only
    its end leads on into the next epoch."""
    stream = Stream(epoch=1, first=0, mixing=True, batches_per_epoch=5, end=3, resumed=True)
    assert stream.next_batch() == (1, 0)
    assert not stream.continues(1, 0, True), "a whole epoch read on in a resumed pass's batches"
    stream.taken = 3
    assert stream.next_batch() == (2, 0)
    assert stream.continues(2, 0, True)
    stream.taken = 9
    assert stream.next_batch() == (3, 1)


def test_a_stream_from_a_resumed_position_runs_on_into_whole_epochs_with_their_keys(control):
    """The rest of epoch 1 from global position 12 (3 batches here), then epochs 2, 3 whole: every
    batch the plan's rows, each sample keyed with its own (repeated augmentation) key epoch."""
    from dali_relabel.loader_state import Start

    paths = PathTable.from_strings([f"class{r % 3}/img{r}.jpg" for r in range(NUM_ROWS)])
    plan = EpochPlan(NUM_ROWS, BATCH, seed=4, repeats=2)
    source = BatchSource("/data", plan, control, paths=paths, labels=np.arange(NUM_ROWS) % 3, epochs=True)
    start = Start(batch=1, position=12)
    assert plan.batches(12) == 3
    control.begin(0, 1, 1, FOREVER, True, start)
    keys = [source.batch_key(Info(i)) for i in range(3 + 5 + 1)]
    assert keys == ([(1, b, True, (1, 12, ())) for b in (1, 2, 3)] + [(2, b, True) for b in range(5)]
                    + [(3, 0, True)])
    resumed_rows, resumed_keys = plan.rows(1, 12)[0], plan.draw_epochs(1, 12)
    for i, key in enumerate(keys):
        got = dict(zip(source.names, source(Info(i))))
        if len(key) == 4:
            span = slice((key[1] - 1) * BATCH, key[1] * BATCH)
            rows, epochs = resumed_rows[span], resumed_keys[span]
        else:
            span = slice(key[1] * BATCH, (key[1] + 1) * BATCH)
            rows, epochs = plan.rows(key[0])[0][span], plan.draw_epochs(key[0])[span]
        np.testing.assert_array_equal(got["rows"].reshape(-1), rows)
        np.testing.assert_array_equal(got["epochs"].reshape(-1), epochs)
    assert set(np.unique(plan.draw_epochs(2))) <= {4, 5}, "epoch 2's copies keyed as 2 * repeats + copy"


def test_a_stream_reads_the_next_epochs_batches_after_the_last_one(control):
    source = _source(control)
    control.begin(0, 1, 3, FOREVER)  # a pass over epoch 1 from batch 3, then epoch 2, 3, ...
    keys = [source.batch_key(Info(i)) for i in range(2 + 5 + 1)]
    assert keys == [(1, 3, True), (1, 4, True)] + [(2, b, True) for b in range(5)] + [(3, 0, True)]
    rows = {epoch: source.epoch_rows(epoch)[0] for epoch in (1, 2, 3)}
    for i, (epoch, batch, _) in enumerate(keys):
        got = dict(zip(source.names, source(Info(i))))
        np.testing.assert_array_equal(got["rows"].reshape(-1), rows[epoch][batch * BATCH:(batch + 1) * BATCH])
        assert (got["epochs"] == epoch).all(), "a batch keyed with another epoch's crops"
    control.stop(0, 5 + 1)  # the loader drains the stream after batch 0 of epoch 2
    with pytest.raises(StopIteration):
        source.batch_key(Info(3))


def test_batches_made_ahead_across_the_epoch_end_are_the_direct_ones(control):
    direct, prefetching = _source(control), PrefetchingSource(_source(control), depth=3)
    control.begin(0, 0, 0, FOREVER)
    try:
        for i in range(12):
            for a, b in zip(prefetching(Info(i)), direct(Info(i))):
                np.testing.assert_array_equal(a, b)
    finally:
        prefetching.close()


def test_a_stream_stopped_at_the_epoch_end_hands_out_nothing_made_ahead(control):
    prefetching = PrefetchingSource(_source(control), depth=3)
    control.begin(0, 0, 0, FOREVER)
    try:
        for i in range(4):
            prefetching(Info(i))  # batch 4 and epoch 1's batches 0-1 are being made ahead
        control.stop(0, 5)  # the next pass starts elsewhere: the loader drains after epoch 0
        prefetching(Info(4))
        with pytest.raises(StopIteration):
            prefetching(Info(5))
    finally:
        prefetching.close()


# -- the tree loader (DALI) ------------------------------------------------------------------------
def _config(**extra):
    return DataConfig(**{**dict(image_size=16, num_threads=1, seed=7, last_batch="drop"), **extra})


def _loader(id_dataset, batch_size=8, **extra):
    from dali_relabel.loader import ReLabelLoader

    pytest.importorskip("nvidia.dali")
    image_root, store = id_dataset
    return ReLabelLoader(image_root, store, batch_size=batch_size, config=_config(**extra), device="cpu",
                         return_rows=True)


def _check_pass(loader, epoch, first=0):
    """One pass: its batches are the epoch's rows in the plan's order from batch ``first`` on, each
    target from its own row's map and each image its own row's (unmixed)."""
    from test_loader import _row_from_pixels

    order = loader.epoch_rows(epoch)
    size = loader.batch_size
    expected = [order[b * size:(b + 1) * size] for b in range(first, loader.plan.num_batches)]
    got = []
    for images, targets, rows in loader:
        assert torch.equal(targets.argmax(1), rows), "a target came from another row's map"
        assert torch.equal(_row_from_pixels(images, loader.config), rows), "an image of another row"
        got.append(rows.tolist())
    assert got == expected, f"the pass did not read epoch {epoch} from batch {first} in its order"


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory):
    from test_loader import make_id_dataset

    return make_id_dataset(str(tmp_path_factory.mktemp("ids")), 40)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_passes_read_every_epoch_in_order_on_one_stream(id_dataset, workers):
    """Four passes, each epoch exactly once and in its order, all from the one DALI epoch: the next
    pass's batches were made before it started (no drain, no reset)."""
    loader = _loader(id_dataset, py_num_workers=workers)
    assert len(loader) == 5
    for epoch in range(4):
        loader.set_epoch(epoch)  # the epoch it reads anyway: keeps what was made ahead
        _check_pass(loader, epoch)
    assert loader._dali_epoch == 0, "a pass drained the pipeline although its batches were made ahead"
    assert loader._stream.next_batch() == (4, 0)
    loader.close()


@pytest.mark.slow
def test_set_epoch_to_another_epoch_drops_what_was_made_ahead(id_dataset):
    loader = _loader(id_dataset)
    _check_pass(loader, 0)
    loader.set_epoch(5)  # DALI made epoch 1's first batches: none of them may be yielded
    _check_pass(loader, 5)
    assert loader._dali_epoch == 1, "the stream made ahead for epoch 1 was not drained"
    _check_pass(loader, 6)
    assert loader._dali_epoch == 1
    loader.close()


@pytest.mark.slow
def test_a_pass_broken_off_is_followed_by_a_whole_next_epoch(id_dataset):
    loader = _loader(id_dataset)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    _check_pass(loader, 1)
    _check_pass(loader, 2)
    loader.close()


@pytest.mark.slow
def test_load_state_dict_mid_run_continues_exactly_there(id_dataset):
    saver = _loader(id_dataset)
    _check_pass(saver, 0)
    for i, _ in enumerate(saver):  # epoch 1, stopped after 2 batches
        if i == 1:
            state = saver.state_dict()
            break
    saver.close()
    assert (state["epoch"], state["batch"]) == (1, 2)
    loader = _loader(id_dataset)
    _check_pass(loader, 0)
    _check_pass(loader, 1)  # the stream now stands at epoch 2
    loader.load_state_dict(state)
    _check_pass(loader, 1, first=2)
    _check_pass(loader, 2)
    loader.close()


@pytest.mark.slow
def test_a_state_loaded_where_the_stream_stands_keeps_what_was_made_ahead(id_dataset):
    loader = _loader(id_dataset)
    _check_pass(loader, 0)
    loader.load_state_dict(loader.state_dict())  # epoch 1, batch 0: where the stream stands
    _check_pass(loader, 1)
    assert loader._dali_epoch == 0
    loader.close()


def _resumed_pass(loader, state):
    """A pass from ``state`` saved on another batch size: the rest of the epoch's global order (the
    plan's rows from the saved position), each target and image its own row's."""
    loader.load_state_dict(state)
    rows, valid = loader.plan.rows(state["epoch"], state["position"], state["unread"])
    got = []
    for images, targets, batch_rows in loader:
        assert torch.equal(targets.argmax(1), batch_rows)
        from test_loader import _row_from_pixels

        assert torch.equal(_row_from_pixels(images, loader.config), batch_rows)
        got += batch_rows.tolist()
    assert got == rows[valid].tolist(), "the resumed pass did not read the rest of the epoch's order"
    return got


def _state_on_batch_size_4(id_dataset, epoch, batches):
    saver = _loader(id_dataset, batch_size=4)
    saver.set_epoch(epoch)
    seen = []
    for i, (_, _, rows) in enumerate(saver):
        seen += rows.tolist()
        if i == batches - 1:
            state = saver.state_dict()
            break
    saver.close()
    return state, seen


@pytest.mark.slow
def test_a_pass_resumed_on_another_batch_size_runs_on_into_the_next_epoch(id_dataset):
    """Elastic resume: the resumed pass reads the rest of the epoch, and its stream goes on into the
    next epoch, which the next pass takes whole (no drain)."""
    state, seen = _state_on_batch_size_4(id_dataset, 1, 3)
    assert state["position"] == 12
    loader = _loader(id_dataset)  # batch size 8
    rest = _resumed_pass(loader, state)
    assert not set(rest) & set(seen), "a sample read twice in the epoch"
    _check_pass(loader, 2)
    _check_pass(loader, 3)
    assert loader._dali_epoch == 0, "the next epoch after a resumed pass was not read on the stream"
    loader.close()


@pytest.mark.slow
def test_a_resumed_position_at_batch_0_of_the_next_epoch_drains_what_was_made_ahead(id_dataset):
    """A state of another batch size 4 samples into epoch 1 starts at batch 0 of epoch 1 in this
    shape, where the stream stands: it is no whole epoch, so what DALI made ahead is drained."""
    state, seen = _state_on_batch_size_4(id_dataset, 1, 1)
    loader = _loader(id_dataset)
    _check_pass(loader, 0)  # the stream now stands at batch 0 of epoch 1
    loader.load_state_dict(state)
    assert loader._start.batch == 0 and loader._start.position == 4
    rest = _resumed_pass(loader, state)
    assert not set(rest) & set(seen), "a sample read twice in the epoch"
    assert loader._dali_epoch == 1, "the whole epoch 1 made ahead was not drained"
    _check_pass(loader, 2)
    loader.close()


def _pixels(loader):
    return [(rows.tolist(), images, targets) for images, targets, rows in loader]


@pytest.mark.slow
def test_mixing_switched_off_between_passes_gets_no_batch_made_for_mixing(id_dataset):
    """CutMix boxes come from the source: the batches made ahead while mixing was on must not reach
    the pass that has it off (timm's mixup_enabled), which must equal a never-mixing loader's."""
    plain = _loader(id_dataset)
    _pixels(plain)
    expected = _pixels(plain)  # epoch 1 unmixed
    plain.close()
    mixed = _loader(id_dataset, cutmix_probability=1.0, mixup_alpha=1.0)
    first = _pixels(mixed)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, expected)), "CutMix changed nothing"
    mixed.mixup_enabled = False
    off = _pixels(mixed)
    assert len(off) == len(expected)
    for (rows_a, images_a, targets_a), (rows_b, images_b, targets_b) in zip(expected, off):
        assert rows_a == rows_b
        torch.testing.assert_close(images_b, images_a, rtol=0, atol=0)
        torch.testing.assert_close(targets_b, targets_a, rtol=0, atol=0)
    mixed.close()


@pytest.mark.slow
def test_mixup_alone_switched_off_keeps_the_stream_and_mixes_nothing(id_dataset):
    """Without CutMix the source's batches do not depend on the switch (Mixup runs in torch): the
    stream goes on, and the pass with mixing off is unmixed."""
    loader = _loader(id_dataset, mixup_alpha=1.0)
    _pixels(loader)
    loader.mixup_enabled = False
    _check_pass(loader, 1)
    assert loader._dali_epoch == 0
    loader.close()


# -- the shard loader (DALI) -----------------------------------------------------------------------
def test_the_next_pipeline_is_started_early_enough_to_be_ready():
    from dali_relabel.lookahead import batches_ahead

    assert batches_ahead(None, None, 2) == 2, "nothing measured yet: once the pipeline has scheduled all"
    assert batches_ahead(0.5, 0.1, 2) == 10
    assert batches_ahead(0.01, 0.1, 2) == 2


@pytest.fixture(scope="module")
def shard_set(tiny_set, tmp_path_factory):
    from dali_relabel.shards import write_shards

    root = tmp_path_factory.mktemp("lookahead-shards")
    return write_shards(tiny_set.images, tiny_set.store, root / "shards", shard_bytes=20_000, progress=False)


def _shard_loader(shard_set, batch_size=4, **extra):
    from dali_relabel.shard_loader import ShardReLabelLoader

    pytest.importorskip("nvidia.dali")
    config = DataConfig(**{**dict(image_size=16, num_threads=1, seed=3), **extra})
    loader = ShardReLabelLoader(shard_set, batch_size, config=config, device="cpu", return_rows=True)
    built = []
    build = loader._iterator

    def recording(epoch, first, checkpoint, mixing, schedule=False, **extra):
        built.append((epoch, first, mixing, "ahead" if schedule else "now"))
        return build(epoch, first, checkpoint, mixing, schedule, **extra)

    loader._iterator = recording  # what the loader builds, and where
    return loader, built


def _shard_pass(loader):
    return [(rows.tolist(), targets) for _, targets, rows in loader]


def _built_ahead(loader):
    """Wait for the pipeline being built ahead, if any: its helper thread records the build only when
    it gets there, which on a busy machine can be after the pass has ended."""
    ahead = loader._ahead
    if ahead is not None and ahead._future is not None:
        ahead._future.result()


def _reference(shard_set, epoch, mixing=True, **extra):
    """A fresh loader's pass over ``epoch``."""
    loader, _ = _shard_loader(shard_set, **extra)
    loader.mixup_enabled = mixing
    loader.set_epoch(epoch)
    batches = _shard_pass(loader)
    loader.close()
    return batches


def _assert_same(got, expected):
    assert [rows for rows, _ in got] == [rows for rows, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_shard_passes_run_on_pipelines_built_ahead(shard_set):
    loader, built = _shard_loader(shard_set)
    for epoch in range(3):
        _assert_same(_shard_pass(loader), _reference(shard_set, epoch))
    _built_ahead(loader)
    assert built[0] == (0, 0, True, "now")
    assert built[1:] == [(1, 0, True, "ahead"), (2, 0, True, "ahead"), (3, 0, True, "ahead")], \
        "a pass built its own pipeline although the next epoch's was known"
    loader.close()


@pytest.mark.slow
def test_shard_set_epoch_elsewhere_drops_the_pipeline_built_ahead(shard_set):
    loader, built = _shard_loader(shard_set)
    _shard_pass(loader)
    loader.set_epoch(5)
    _assert_same(_shard_pass(loader), _reference(shard_set, 5))
    assert (5, 0, True, "now") in built
    loader.close()


@pytest.mark.slow
def test_shard_pass_broken_off_then_load_state_dict_mid_run(shard_set):
    loader, built = _shard_loader(shard_set)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    _assert_same(_shard_pass(loader), _reference(shard_set, 1))  # a break: the next epoch, whole
    reference = _reference(shard_set, 4)
    saver, _ = _shard_loader(shard_set)
    saver.set_epoch(4)
    batches = iter(saver)
    for _ in range(3):
        next(batches)
    state = saver.state_dict()
    saver.close()
    loader.load_state_dict(state)  # the pipeline built ahead (epoch 2) is not this position's
    _assert_same(_shard_pass(loader), reference[3:])
    _assert_same(_shard_pass(loader), _reference(shard_set, 5))
    loader.close()


@pytest.mark.slow
def test_shard_resume_on_another_batch_size_at_batch_0_builds_its_own_pipeline(shard_set):
    """The pipeline built ahead for epoch 1 reads the whole epoch; a state of another batch size a
    few samples into epoch 1 (batch 0 in this shape) must read only the unread samples."""
    from dali_relabel.loader_state import merge_states

    saver, _ = _shard_loader(shard_set, batch_size=2)
    saver.set_epoch(1)
    batches = iter(saver)
    seen = next(batches)[2].tolist()
    state = merge_states([saver.state_dict()])
    saver.close()
    loader, built = _shard_loader(shard_set)
    _shard_pass(loader)  # epoch 0: epoch 1's pipeline is built ahead
    _built_ahead(loader)
    assert built[-1] == (1, 0, True, "ahead")
    loader.load_state_dict(state)
    assert loader._start.batch == 0 and loader._start.seen.sum() == len(seen)
    rest = [row for rows, _ in _shard_pass(loader) for row in rows]
    assert built[2] == (1, 0, True, "now"), "the resumed pass took the pipeline built for the whole epoch"
    assert not set(rest) & set(seen), "a sample read twice in the epoch"
    _assert_same(_shard_pass(loader), _reference(shard_set, 2))
    loader.close()


@pytest.mark.slow
def test_shard_mixing_switched_off_drops_the_pipeline_built_for_mixing(shard_set):
    mixing = dict(cutmix_probability=1.0, mixup_alpha=0.5)
    loader, built = _shard_loader(shard_set, **mixing)
    _shard_pass(loader)
    loader.mixup_enabled = False
    _assert_same(_shard_pass(loader), _reference(shard_set, 1, mixing=False, **mixing))
    assert (1, 0, False, "now") in built
    loader.close()


def test_the_pace_times_a_pipelines_start_up_and_the_median_batch(monkeypatch):
    import dali_relabel.lookahead as lookahead

    clock = iter([0.0, 1.0, 1.125, 1.25, 5.0, 5.125, 10.0, 10.0])  # a pause of the loop among 1/8 s batches
    monkeypatch.setattr(lookahead.time, "monotonic", lambda: next(clock))
    pace = lookahead.Pace(scheduled=2)
    assert pace.batches_ahead() == 2
    pace.pass_started()
    pace.pipeline_taken(built_now=True)
    for _ in range(5):
        pace.batch_taken()
    assert pace.startup == 1.0
    assert pace.batches_ahead() == 16  # twice 1 s of start-up at the median 1/8 s a batch
    pace.pass_started()
    pace.pipeline_taken(built_now=False)  # built ahead: its wait is no start-up
    pace.batch_taken()
    assert pace.startup == 1.0
