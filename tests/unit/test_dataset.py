"""Dataset versions: splits, shards, manifest id, verification, corrupt shards."""

from __future__ import annotations

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcore.data.config import SplitConfig, TokenizerConfig
from mmcore.data.dataset import DatasetError, DatasetVersion, ShardWriter, assign_split, build_manifest, url_key
from mmcore.data.schema import SchemaError, read_shard
from mmcore.data.tokenizer import train_tokenizer


def test_split_is_deterministic_and_close_to_the_fractions():
    cfg = SplitConfig(val_fraction=0.1, test_fraction=0.2)
    keys = [url_key(f"http://e.com/{i}.jpg") for i in range(5000)]
    splits = [assign_split(k, cfg) for k in keys]
    assert splits == [assign_split(k, cfg) for k in keys]
    counts = collections.Counter(splits)
    assert abs(counts["test"] / 5000 - 0.2) < 0.02 and abs(counts["val"] / 5000 - 0.1) < 0.02
    assert [assign_split(k, SplitConfig(salt="other")) for k in keys] != [assign_split(k, SplitConfig()) for k in keys]


def _rows(n, start=0):
    return pa.table({
        "row": list(range(start, start + n)), "url": [f"http://e.com/{i}.jpg" for i in range(start, start + n)],
        "caption": [f"a red circle number {i}" for i in range(start, start + n)],
        "image": [bytes([i % 256]) * 10 for i in range(n)], "width": pa.array([64] * n, pa.int32()),
        "height": pa.array([64] * n, pa.int32()), "sha256": ["0" * 64] * n, "label": [i % 3 for i in range(n)],
    })


def _version(root, n=300, rows_per_shard=64):
    root.mkdir()
    writer = ShardWriter(root, pa.schema([("label", pa.int64())]), rows_per_shard, SplitConfig())
    writer.write(_rows(n // 2))
    writer.write(_rows(n - n // 2, start=n // 2))
    shards = writer.close()
    train_tokenizer(writer.train_captions, TokenizerConfig()).save(str(root / "tokenizer.json"))
    pq.write_table(pa.table({"row": [999]}), root / "rejects.parquet")
    stats = {"in": n + 1, "kept": n, "rejected": {"http_error": 1}}
    manifest = build_manifest(root, shards, stats, {}, {}, writer.schema, 300)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return DatasetVersion.open(root)


def test_shards_hold_every_row_once_in_source_order(tmp_path):
    version = _version(tmp_path / "v")
    assert version.verify() == []
    shards = version.manifest["shards"]
    assert all(s["rows"] <= 64 for s in shards)
    urls = [u for split in ("train", "val", "test") for u in version.read(split).column("url").to_pylist()]
    assert sorted(urls) == sorted(f"http://e.com/{i}.jpg" for i in range(300))
    train = version.read("train").column("url").to_pylist()
    assert train == sorted(train, key=lambda u: int(u.rsplit("/", 1)[1].split(".")[0]))


def test_id_depends_on_content_only(tmp_path):
    assert _version(tmp_path / "a").id == _version(tmp_path / "b").id
    assert _version(tmp_path / "c", n=301).id != _version(tmp_path / "d").id


def test_verify_names_the_tampered_file(tmp_path):
    version = _version(tmp_path / "v")
    shard = version.shard_paths("train")[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)  # a valid file, one row short
    (version.path / "tokenizer.json").unlink()
    problems = version.verify()
    assert any(str(shard) in p and "sha256" in p for p in problems)
    assert any(str(shard) in p and "rows, manifest says" in p for p in problems)
    assert any("tokenizer.json: missing" in p for p in problems)


def test_corrupt_shard_on_read_names_the_file(tmp_path):
    version = _version(tmp_path / "v")
    shard = version.shard_paths("val")[0]
    shard.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SchemaError, match=str(shard)):
        version.read("val")


def test_schema_mismatch_names_file_and_column(tmp_path):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"key": ["a"], "url": ["u"], "caption": ["c"], "image": ["not bytes"],
                             "width": pa.array([1], pa.int32()), "height": pa.array([1], pa.int32()),
                             "sha256": ["s"], "split": ["train"]}), path)
    with pytest.raises(SchemaError, match=r"shard.parquet: column 'image' has type string, expected binary"):
        read_shard(path)
    pq.write_table(pa.table({"key": ["a"]}), path)
    with pytest.raises(SchemaError, match="missing column 'url'"):
        read_shard(path)


def test_open_refuses_what_is_not_a_finished_version(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        DatasetVersion.open(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(DatasetError, match="never finished"):
        DatasetVersion.open(tmp_path / "half")
