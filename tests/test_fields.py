"""The field table: the source's outputs, the shards' members and the graphs' output names all come
from it, and the data each part makes matches what it declares."""
import tarfile

import numpy as np
import pytest

from dali_relabel import fields
from dali_relabel.config import DataConfig
from dali_relabel.mixing import CutMixSpec
from dali_relabel.paths import PathTable
from dali_relabel.plan import EpochPlan
from dali_relabel.shards import EXTENSIONS, member_dtype
from dali_relabel.sources import BatchSource, EpochControl, output_types


class Info:
    def __init__(self, iteration, epoch_idx=0):
        self.iteration, self.epoch_idx = iteration, epoch_idx


def _source(**options):
    plan = EpochPlan(12, 4, seed=1)
    control = EpochControl()
    control.begin(0, 0, 0, plan.num_batches)
    return BatchSource("/images", plan, control, paths=PathTable.from_strings([f"c/{i}.jpg" for i in range(12)]),
                       labels=np.arange(12) % 3, **options)


@pytest.mark.parametrize("options", [{}, {"epochs": True}, {"epochs": True, "cutmix": CutMixSpec(1.0, 1.0, 16)}])
def test_the_source_makes_what_its_fields_declare(options):
    source = _source(**options)
    assert [f.name for f in source.fields] == source.names
    assert list(source.fields) == [f for f in fields.SOURCE_FIELDS if f in source.fields], "the table's order"
    outputs = source(Info(1))
    assert len(outputs) == len(source.fields)
    for field, array in zip(source.fields, outputs):
        assert array.shape[0] == 4, field.name
        assert array.ndim - 1 == field.ndim, field.name
        if field.dtype is not None:
            assert array.dtype == np.dtype(field.dtype), field.name


def test_output_types_are_the_fields_types():
    from nvidia.dali import types

    source = _source(epochs=True, cutmix=CutMixSpec(1.0, 1.0, 16))
    dtypes, ndims = output_types(source)
    assert dict(zip(source.names, dtypes)) == {"paths": types.UINT8, "labels": types.INT32, "rows": types.INT64,
                                               "valid": types.UINT8, "epochs": types.INT64, "mix_box": types.FLOAT}
    assert ndims == [1, 1, 1, 1, 0, 1]
    assert fields.LOGITS.dali_type() is None, "a store's logits come in its own dtype"


def test_shard_members_follow_the_table():
    assert EXTENSIONS == ("jpg", "logits", "ids", "label", "row")
    assert member_dtype(fields.LOGITS, "int32") == np.dtype("<f2"), "shards hold float16 logits"
    assert member_dtype(fields.CLASS_IDS, "uint16") == np.dtype("<u2")
    assert member_dtype(fields.ROWS, None).itemsize == 8 and member_dtype(fields.LABELS, None).itemsize == 4


@pytest.mark.slow
def test_shards_written_hold_the_declared_members(tmp_path):
    from dali_relabel.shards import write_shards
    from dali_relabel.store import write_store
    from helpers import make_jpeg_tree, random_maps

    relpaths = make_jpeg_tree(tmp_path / "images", 2, 2)
    logits, ids = random_maps(4, 2, 3, 3, 5, seed=2)
    store = write_store(tmp_path / "s.h5", relpaths, logits, ids, 5, labels=[0, 0, 1, 1],
                        class_names=["class_00", "class_01", "c2", "c3", "c4"])
    shards = write_shards(tmp_path / "images", store, tmp_path / "shards", progress=False, workers=1)
    with tarfile.open(shards.path(shards.shards[0]["name"])) as tar:
        members = tar.getmembers()
        first = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in members[:len(EXTENSIONS)]}
    assert [m.name.split(".", 1)[1] for m in members[:len(EXTENSIONS)]] == list(EXTENSIONS)
    row = int(np.frombuffer(first["row"], shards.dtype(fields.ROWS))[0])
    np.testing.assert_array_equal(np.frombuffer(first["logits"], shards.dtype(fields.LOGITS)).reshape(2, 3, 3),
                                  logits[row])
    np.testing.assert_array_equal(np.frombuffer(first["ids"], shards.dtype(fields.CLASS_IDS)).reshape(2, 3, 3),
                                  ids[row])
    assert np.frombuffer(first["label"], shards.dtype(fields.LABELS))[0] == [0, 0, 1, 1][row]
    assert first["jpg"] == (tmp_path / "images" / relpaths[row]).read_bytes()


def test_graphs_export_their_output_names_from_the_table():
    pytest.importorskip("nvidia.dali")
    from dali_relabel.pipelines import graphs

    declared = {getattr(fields, name).name for name in dir(fields) if isinstance(getattr(fields, name), fields.Field)}
    localized = DataConfig(cutmix_probability=1.0, cutmix_mode="localized")
    assert graphs.train_outputs(DataConfig(), False) == ["images", "targets", "labels", "rows", "valid"]
    assert graphs.train_outputs(localized, True)[-2:] == ["mix_box", "pasted"]
    assert graphs.shard_train_outputs(DataConfig(cutmix_probability=1.0), True) == \
        ["images", "targets", "labels", "rows", "mix_box"]
    for names in (graphs.VALIDATION_OUTPUTS, graphs.SHARD_VALIDATION_OUTPUTS, graphs.TEACHER_OUTPUTS,
                  graphs.train_outputs(localized, True)):
        assert set(names) <= declared
