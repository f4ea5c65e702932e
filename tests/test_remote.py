"""Object storage: an S3-compatible server (moto's, on 127.0.0.1) holding an image tree, its store and
tar shards; the loaders read them through DALI's own readers and give exactly what the local copies
give; missing buckets and objects, refused credentials, empty prefixes and shards truncated during a
run are named."""
import os
import shutil

import numpy as np
import pytest
import torch

from dali_relabel import remote
from dali_relabel.config import DataConfig
from dali_relabel.store import StoreError, write_store
from helpers import S3Server, make_jpeg_tree, random_maps

pytest.importorskip("moto.server")
pytest.importorskip("boto3")
pytestmark = pytest.mark.slow  # every test here needs the server (a process) and its uploads

SMALL = dict(image_size=16, num_threads=1, py_num_workers=0, seed=5)
BUCKET = "relabel-data"


def _upload_tree(local_root, url):
    for directory, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(directory, name)
            bucket, key = remote.split(remote.join(url, os.path.relpath(path, local_root)))
            remote.client().upload_file(path, bucket, key)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, the AWS variables pointing at it (for boto3 and DALI), a private cache, and the
    data: a tree, its store and shards locally and under ``s3://relabel-data/``."""
    root = tmp_path_factory.mktemp("s3")
    server = S3Server()
    saved = {key: os.environ.get(key) for key in server.environment()}
    os.environ.update(server.environment())
    original_cache = remote.cache_dir
    remote.cache_dir = lambda: str(root / "cache")
    try:
        rng = np.random.default_rng(1)
        sizes = [(int(rng.integers(24, 60)), int(rng.integers(24, 60))) for _ in range(24)]
        relpaths = make_jpeg_tree(root / "images", 4, 6, sizes=sizes)
        logits, ids = random_maps(24, 3, 4, 4, 10, seed=2)
        store = write_store(root / "store.h5", relpaths, logits, ids, 10,
                            labels=[int(p.split("/")[0][-2:]) for p in relpaths],
                            class_names=[f"class_{c:02d}" for c in range(4)] + [f"x{c}" for c in range(6)])
        remote.client().create_bucket(Bucket=BUCKET)
        _upload_tree(root / "images", f"s3://{BUCKET}/images")
        remote.client().upload_file(str(store), BUCKET, "store.h5")
        from dali_relabel.shards import write_shards
        from dali_relabel.tools.cli import main

        shards = write_shards(root / "images", store, root / "shards", shard_bytes=12_000, progress=False)
        assert main(["shard", "--images", str(root / "images"), "--store", str(store), "--out",
                     f"s3://{BUCKET}/shards", "--shard-size", "12000", "--quiet"]) == 0
        yield dict(root=root, images=str(root / "images"), store=str(store), shards=shards, server=server)
    finally:
        remote.cache_dir = original_cache
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.close()


def test_an_s3_tree_lists_like_its_local_copy(s3, tmp_path):
    from dali_relabel.imagefolder import list_images

    local, listed = list_images(s3["images"]), list_images(f"s3://{BUCKET}/images")
    assert (listed.relpaths, listed.labels, listed.classes) == (local.relpaths, local.labels, local.classes)
    # nested folders, files beside folders, other files: the walk's order on both sides
    tree = tmp_path / "nested"
    make_jpeg_tree(tree, 2, 2)
    for rel in ("class_00/b/z.JPEG", "class_00/a/y.jpg", "class_00/zz.png", "class_01/notes.txt",
                "class_01/a/b/c.jpeg", ".hidden/x.JPEG"):
        os.makedirs(os.path.dirname(tree / rel), exist_ok=True)
        shutil.copy(tree / "class_00" / "img_000.JPEG", tree / rel)
    _upload_tree(tree, f"s3://{BUCKET}/nested")
    local, listed = list_images(tree), list_images(f"s3://{BUCKET}/nested")
    assert (listed.relpaths, listed.labels, listed.classes) == (local.relpaths, local.labels, local.classes)
    assert "class_00/a/y.jpg" in listed.relpaths and listed.path(0) == f"s3://{BUCKET}/nested/{listed.relpaths[0]}"


def _epoch(loader):
    batches = list(loader)
    return (torch.cat([b[-1] for b in batches]).tolist(), torch.cat([b[1] for b in batches]),
            torch.cat([b[0] for b in batches]))


def test_training_from_an_s3_tree_equals_the_local_copy(s3):
    from dali_relabel.loader import ReLabelLoader, ValidationLoader

    config = DataConfig(**SMALL)
    local = ReLabelLoader(s3["images"], s3["store"], 8, config=config, device="cpu", return_rows=True)
    cloud = ReLabelLoader(f"s3://{BUCKET}/images", f"s3://{BUCKET}/store.h5", 8, config=config, device="cpu",
                          return_rows=True)
    assert cloud.store.url == f"s3://{BUCKET}/store.h5" and cloud.store.path.startswith(remote.cache_dir())
    for epoch in range(2):
        local.set_epoch(epoch)
        cloud.set_epoch(epoch)
        (rows_a, targets_a, images_a), (rows_b, targets_b, images_b) = _epoch(local), _epoch(cloud)
        assert rows_a == rows_b and sorted(rows_b) == list(range(24))
        torch.testing.assert_close(targets_b, targets_a, rtol=0, atol=0)
        torch.testing.assert_close(images_b, images_a, rtol=0, atol=0)
    local.close()
    cloud.close()
    val = ValidationLoader(f"s3://{BUCKET}/images", 8, config=config, device="cpu", return_rows=True)
    assert sorted(r for _, _, rows in val for r in rows.tolist()) == list(range(24))
    val.close()


def test_training_from_s3_shards_equals_the_local_copy(s3):
    from dali_relabel.shard_loader import ShardReLabelLoader
    from dali_relabel.shards import ShardSet

    on_s3 = ShardSet.load(f"s3://{BUCKET}/shards")
    assert [s["name"] for s in on_s3.shards] == [s["name"] for s in s3["shards"].shards]
    assert [s["bytes"] for s in on_s3.shards] == [s["bytes"] for s in s3["shards"].shards], \
        "the uploaded shards are the shards written locally"
    index = on_s3.reader_index_path(on_s3.shards[0]["name"])
    assert index.startswith(remote.cache_dir()), "DALI is given local copies of the index files"
    config = DataConfig(**SMALL)
    local = ShardReLabelLoader(s3["shards"], 8, config=config, device="cpu", return_rows=True)
    cloud = ShardReLabelLoader(f"s3://{BUCKET}/shards/shard-{{000000..{len(on_s3.shards) - 1:06d}}}.tar", 8,
                               config=config, device="cpu", return_rows=True)
    for epoch in range(2):
        local.set_epoch(epoch)
        cloud.set_epoch(epoch)
        (rows_a, targets_a, images_a), (rows_b, targets_b, images_b) = _epoch(local), _epoch(cloud)
        assert rows_a == rows_b and sorted(rows_b) == list(range(24))
        torch.testing.assert_close(targets_b, targets_a, rtol=0, atol=0)
        torch.testing.assert_close(images_b, images_a, rtol=0, atol=0)


def test_the_store_is_fetched_once_and_checked_against_its_hash(s3, monkeypatch):
    import h5py

    from dali_relabel.store import LabelStore

    first = LabelStore(f"s3://{BUCKET}/store.h5")
    fetched = []
    real = remote.client().download_file
    monkeypatch.setattr(remote.client(), "download_file", lambda *a, **k: (fetched.append(a), real(*a, **k))[1])
    again = LabelStore(f"s3://{BUCKET}/store.h5")
    assert again.path == first.path and fetched == [], "an unchanged store is not fetched again"
    # a store whose values do not match its content hash is refused, naming the URL
    bad = s3["root"] / "bad.h5"
    shutil.copy(s3["store"], bad)
    with h5py.File(bad, "r+") as f:
        f["logits"][3] = f["logits"][3] + 1
    remote.client().upload_file(str(bad), BUCKET, "bad.h5")
    with pytest.raises(StoreError, match=f"s3://{BUCKET}/bad.h5: the fetched copy is refused: "
                                         "content checksum mismatch"):
        LabelStore(f"s3://{BUCKET}/bad.h5")
    assert len(fetched) == 1 and not any(n.endswith("bad.h5") for n in os.listdir(remote.cache_dir())), \
        "a refused copy is not kept"


def test_missing_buckets_objects_and_shards_are_named(s3):
    from dali_relabel.loader import ReLabelLoader
    from dali_relabel.shards import ShardError, ShardSet
    from dali_relabel.store import LabelStore

    with pytest.raises(remote.RemoteError, match="s3://no-such-bucket/images: the bucket 'no-such-bucket' does not"):
        ReLabelLoader("s3://no-such-bucket/images", s3["store"], 8, config=DataConfig(**SMALL), device="cpu")
    with pytest.raises(remote.RemoteError, match=f"s3://{BUCKET}/nothing.h5: no such object"):
        LabelStore(f"s3://{BUCKET}/nothing.h5")
    with pytest.raises(ShardError, match=f"s3://{BUCKET}/empty: no shards under this URL"):
        ShardSet.load(f"s3://{BUCKET}/empty")
    with pytest.raises(ShardError, match=f"s3://{BUCKET}/images: no shards under this URL"):
        ShardSet.load(f"s3://{BUCKET}/images")  # an image tree, not shards
    with pytest.raises(ShardError, match=f"shard-0000[0-9][0-9].tar is not in s3://{BUCKET}/shards/index.json"):
        ShardSet.load(f"s3://{BUCKET}/shards/shard-{{000000..000099}}.tar")
    with pytest.raises(remote.RemoteError, match="only s3:// URLs"):
        ShardSet.load("gs://bucket/shards")


def test_refused_credentials_are_named(s3, monkeypatch):
    from dali_relabel.shards import ShardSet

    guarded = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this one checks credentials
    try:
        for key, value in guarded.environment().items():
            monkeypatch.setenv(key, value)
        with pytest.raises(remote.RemoteError, match=f"s3://{BUCKET}/shards/index.json: access denied "
                                                     r"\(InvalidAccessKeyId\): check AWS_ACCESS_KEY_ID"):
            ShardSet.load(f"s3://{BUCKET}/shards")
    finally:
        guarded.close()


def test_a_shard_truncated_during_the_run_is_named(s3):
    from dali_relabel.shard_loader import ShardReLabelLoader
    from dali_relabel.shards import ShardError

    url = f"s3://{BUCKET}/victim"
    remote.upload_directory(str(s3["shards"].directory), url, last=("index.json",))
    loader = ShardReLabelLoader(url, 4, config=DataConfig(**SMALL), device="cpu", shuffle=False)
    batches = iter(loader)
    next(batches)
    victim = loader.shards.shards[-1]["name"]  # read last in the stored order
    data = open(os.path.join(s3["shards"].directory, victim), "rb").read()
    remote.client().put_object(Bucket=BUCKET, Key=f"victim/{victim}", Body=data[:len(data) // 2])
    with pytest.raises(ShardError, match=f"{url}/{victim}: .* bytes, but .* were written: the shard is truncated"):
        for _ in batches:
            pass


def test_a_shard_truncated_during_the_run_is_skipped_and_counted_when_asked(s3):
    from dali_relabel.shard_loader import ShardReLabelLoader

    url = f"s3://{BUCKET}/skipped"
    remote.upload_directory(str(s3["shards"].directory), url, last=("index.json",))
    loader = ShardReLabelLoader(url, 2, config=DataConfig(**SMALL, last_batch="pad"), device="cpu", shuffle=False,
                                return_rows=True, skip_bad_shards=True)
    batches = iter(loader)
    rows = next(batches)[2].tolist()
    victim = loader.shards.shards[-1]["name"]  # read last in the stored order
    data = open(os.path.join(s3["shards"].directory, victim), "rb").read()
    remote.client().put_object(Bucket=BUCKET, Key=f"skipped/{victim}", Body=data[:len(data) // 2])
    with pytest.warns(RuntimeWarning, match=f"{url}/{victim}: .* bytes.*left out of the pass over epoch 0 while "
                                            "reading it"):
        rows += [r for _, _, batch in batches for r in batch.tolist()]
    lost = set(range(24)) - set(rows)
    assert len(rows) == len(set(rows)) and lost, "every other sample once"
    assert loader.skipped_shards[victim]["samples"] == len(lost) <= loader.shards.shards[-1]["samples"]
    import tarfile

    with tarfile.open(os.path.join(s3["shards"].directory, victim)) as tar:
        in_victim = {int(name.split(".")[0]) for name in tar.getnames()}
    assert lost <= in_victim
    with pytest.warns(RuntimeWarning, match=f"{victim}: .*at its start"):  # the next pass leaves it out at once
        assert sorted(r for _, _, batch in loader for r in batch.tolist()) == sorted(set(range(24)) - in_victim)
    assert loader.skipped_shards[victim]["passes"] == 2
    loader.close()


def test_an_image_gone_from_the_bucket_during_the_run_is_named(s3):
    from dali_relabel.bad_images import BadImageError
    from dali_relabel.loader import ReLabelLoader

    url = f"s3://{BUCKET}/gone"
    _upload_tree(s3["images"], url)
    loader = ReLabelLoader(url, s3["store"], 8, config=DataConfig(**SMALL), device="cpu", shuffle=False)
    victim = loader.store.paths[20]  # in the last batch
    remote.client().delete_object(Bucket=BUCKET, Key=f"gone/{victim}")
    with pytest.raises(BadImageError, match=f"{url}/{victim}: cannot be read \\(no such object"):
        for _ in loader:
            pass
    loader.close()
