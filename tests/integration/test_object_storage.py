"""Dataset versions and runs in a bucket: a real S3 API on 127.0.0.1 (moto_server, tests/objectstore.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmcore import storage
from mmcore.data.config import DownloadConfig, GuardConfig, IngestConfig, SourceConfig
from mmcore.data.dataset import MANIFEST, DatasetVersion
from mmcore.data.ingest import ingest
from mmcore.data.synthetic.corpus import SampleSpec, make_sample
from tests.objectstore import ObjectStore, free_port

pytestmark = pytest.mark.integration


def _mmpipe(*args, env=None):
    cli = Path(sys.executable).with_name("mmpipe")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=600, env=env)


def _config(url_list: Path, out: str) -> IngestConfig:
    return IngestConfig(source=SourceConfig(path=str(url_list)), out=out, rows_per_shard=128,
                        guard=GuardConfig(allow_networks=["127.0.0.1/32"]),
                        download=DownloadConfig(samples_per_shard=100))


@pytest.fixture(scope="module")
def url_list(served_dir):
    server, root = served_dir
    return make_sample(root / "bucket-corpus", f"{server.url}/bucket-corpus",
                       SampleSpec(synthetic=240, digits=60, photos=False, defects=False, seed=11))


@pytest.fixture(scope="module")
def bucket(object_store):
    return object_store.bucket()


@pytest.mark.fault
def test_ingest_into_a_bucket_counts_only_once_its_manifest_is_written_and_resumes_from_the_bucket(
        object_store, bucket, url_list, served_dir, mmpipe_home, fault):
    server, _ = served_dir
    out = f"{bucket}/datasets/v1"
    leftover = storage.path(out) / "shards" / "train-00000.parquet"
    leftover.write_bytes(b"half of an upload that never finished")
    assert "no manifest.json" in _mmpipe("dataset", "verify", out).stderr

    def crash(rows):
        raise RuntimeError("model-score filter crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        ingest(_config(url_list, out), extra_filters=[crash])
    assert object_store.keys(out + "/") == ["datasets/v1/shards/train-00000.parquet"], "nothing new is visible"
    finished = [k for k in object_store.keys(f"{out}.partial/") if k.endswith("_stats.json")]
    assert len(finished) == 3, "the downloaded shards are kept in the bucket"
    assert not list((mmpipe_home / "tmp").iterdir()), "no local staging dir is left behind"

    before = len(server.requests)
    version = ingest(_config(url_list, out))
    assert [p for p in server.requests[before:] if p.startswith("/bucket-corpus/")] == [], \
        "the shards finished before the crash are not fetched again"
    assert version.verify() == [] and version.manifest["rows"]["in"] == 300
    assert object_store.keys(out + "/") == sorted(f"datasets/v1/{name}" for name in
                                                  [*version.manifest["files"], MANIFEST])
    assert object_store.keys(f"{out}.partial/") == [], "the work dir in the bucket is removed on success"

    shown = _mmpipe("dataset", "show", out)
    assert shown.returncode == 0 and version.id in shown.stdout, shown.stderr
    verified = _mmpipe("dataset", "verify", out)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr
    reopened = DatasetVersion.open(out)
    assert reopened.read("test").num_rows == version.manifest["splits"]["test"]

    copy = f"{bucket}/datasets/flipped"
    storage.download_tree(storage.path(out), mmpipe_home / "flip")
    shard = sorted((mmpipe_home / "flip" / "shards").glob("train-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    storage.upload_tree(mmpipe_home / "flip", storage.path(copy), last=MANIFEST)
    flipped = _mmpipe("dataset", "verify", copy)
    assert flipped.returncode == 1 and f"{copy}/shards/{shard.name}: sha256" in flipped.stdout
    fault("bucket", "ingest into a bucket crashed after img2dataset's 3 shards; objects of an upload that never "
          "finished left under the version; a byte flipped in an uploaded shard", 3,
          "nothing: the version was not visible until its manifest was uploaded, the resumed ingest fetched no "
          "image again, the leftovers were removed; `dataset verify` named the flipped shard")


@pytest.mark.fault
def test_a_bucket_that_cannot_be_used_fails_before_any_download(object_store, url_list, served_dir, fault):
    server, _ = served_dir
    before = len(server.requests)
    missing = _mmpipe("ingest", str(url_list), "--out", "s3://no-such-bucket/v1", "--allow-network", "127.0.0.1/32")
    assert missing.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in missing.stderr and len(missing.stderr.splitlines()) == 2

    down = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    result = _mmpipe("ingest", str(url_list), "--out", f"{object_store.bucket()}/v1", "--allow-network",
                     "127.0.0.1/32", env=down)
    assert result.returncode == 2 and "does not answer" in result.stderr, result.stderr
    assert len(server.requests) == before

    shown = _mmpipe("dataset", "show", "s3://no-such-bucket/v1")
    assert shown.returncode == 2 and "does not exist" in shown.stderr
    odd = _mmpipe("dataset", "show", "gs2://elsewhere/v1")
    assert odd.returncode == 2 and "unsupported location" in odd.stderr
    fault("bucket", "`mmpipe ingest` to a bucket that does not exist and to an endpoint that does not answer; "
          "`dataset show` of a missing bucket and of an unsupported scheme", 4,
          "nothing: one message each (exit status 2), no image fetched")


@pytest.mark.fault
def test_credentials_the_store_refuses_fail_before_any_download_or_worker(url_list, served_dir, fault):
    server, _ = served_dir
    store = ObjectStore(auth=True)  # checks signatures, unlike the session's store
    try:
        bucket = store.bucket()  # the store's own credentials work
        wrong = "wrong-secret-9c1e"
        env = {**os.environ, "AWS_ENDPOINT_URL": store.endpoint,
               "AWS_ACCESS_KEY_ID": store.credentials["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": wrong}
        before = len(server.requests)
        ingest = _mmpipe("ingest", str(url_list), "--out", f"{bucket}/v1", "--allow-network", "127.0.0.1/32", env=env)
        train = _mmpipe("train", "contrastive", "--recipe", "debug", "--dataset", f"{bucket}/v1", env=env)
        for result in (ingest, train):
            assert result.returncode == 2, result.stderr
            assert "refused the credentials" in result.stderr and wrong not in result.stderr, result.stderr
            assert "Traceback" not in result.stderr and " on dataset " not in result.stdout + result.stderr
        assert len(server.requests) == before
        assert store.keys(bucket) == []
        fault("bucket", "a wrong secret key for `mmpipe ingest` and `mmpipe train`, against an S3 server that "
              "checks signatures", 2, "nothing: one message each naming the bucket, the secret in neither, "
              "no image fetched, no object written, no worker started")
    finally:
        store.stop()


def test_a_conversation_files_images_are_read_from_a_bucket(bucket, tmp_path, mmpipe_home):
    """`--images s3://bucket/prefix`: each path is read from the bucket through the guard (its byte cap and
    image check); a path the bucket lacks, or one that leaves the prefix, is rejected with its reason."""
    import json

    from tests.conftest import jpeg_bytes

    images = f"{bucket}/images"
    for i, color in enumerate([(200, 30, 30), (30, 30, 200), (30, 160, 40)]):
        (storage.path(images) / "coco" / f"{i}.jpg").write_bytes(jpeg_bytes(color=color))
    (storage.path(bucket) / "secret.jpg").write_bytes(jpeg_bytes())
    rows = {"red": "coco/0.jpg", "blue": "coco/1.jpg", "green": "coco/2.jpg", "missing": "coco/9.jpg",
            "escape": "coco/../../secret.jpg"}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the whole picture?"},
        {"from": "gpt", "value": f"It is {i if i in ('red', 'blue', 'green') else 'grey'} all over."}]}) + "\n"
        for i, image in rows.items()))
    version = ingest(IngestConfig(source=SourceConfig(path=str(path), kind="instructions", images=images),
                                  out=str(tmp_path / "chats")))
    assert version.manifest["rows"]["kept"] == 3
    assert version.manifest["rows"]["rejected"] == {"image_not_found": 1, "path_outside_root": 1}
    assert sum(version.manifest["splits"].values()) == 3 and version.verify() == []


def test_a_derived_version_of_a_dataset_in_a_bucket_is_stored_and_read_beside_it(bucket, object_store, train_dataset,
                                                                                 tmp_path, capsys):
    """A dataset version in a bucket: its derived version (data/derived.py) is written into the bucket beside it,
    the same codes as of the same dataset on a disk, reused from the bucket, and read from it by the stream."""
    from mmcore.data.derived import Derivation, derive
    from mmcore.data.units import read_row_groups, work_units
    from tests.integration.test_derived import derived_codes, tokenizer_bundle

    out = f"{bucket}/datasets/copied"
    storage.upload_tree(train_dataset.path, storage.path(out), last=MANIFEST)
    version = DatasetVersion.open(out)
    derivation = Derivation("image-codes", "models:/mmpipe-image-tokenizer/9", tokenizer_bundle(tmp_path, version, 9))
    capsys.readouterr()
    derived = derive(version, derivation)
    assert f"computing image-codes of dataset {version.id}" in capsys.readouterr().out
    prefix = f"{out}/derived/{derivation.name}/"
    assert object_store.keys(prefix) == sorted(
        f"{prefix.split('/', 3)[3]}{name}" for name in
        ["manifest.json", *(f"shards/{s['name']}" for s in derived.manifest["shards"])])
    assert np.array_equal(derived_codes(derived), derived_codes(derive(train_dataset, derivation)))

    capsys.readouterr()
    again = derive(version, derivation)
    assert "computing" not in capsys.readouterr().out and again.manifest == derived.manifest
    unit = work_units(version, "train")[0]
    rows = read_row_groups({k: [v] for k, v in {**unit, "derived": derived.shard(unit["path"])}.items()}, ["codes"])
    assert rows.num_rows == unit["rows"] and rows.column("codes").type.list_size == len(derived_codes(derived)[0])
