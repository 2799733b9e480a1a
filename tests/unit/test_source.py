"""Reading URL lists: missing columns fail early and name the file; bad rows are counted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcore.data.config import GuardConfig, SourceConfig
from mmcore.data.schema import SchemaError
from mmcore.data.source import Rejects, precheck, read_source


def _write(path, fmt, rows):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        cols = list(rows[0])
        path.write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
@pytest.mark.parametrize("missing", ["url", "caption"])
def test_missing_column_names_the_column_and_file(tmp_path, fmt, missing):
    row = {"url": "http://example.com/a.jpg", "caption": "a cat on a mat"}
    del row[missing]
    row["other"] = "x"
    path = _write(tmp_path / f"list.{fmt}", fmt, [row])
    with pytest.raises(SchemaError) as err:
        read_source(SourceConfig(path=str(path)))
    assert str(path) in str(err.value) and repr(missing) in str(err.value)


def test_custom_column_names_and_extras(tmp_path):
    path = _write(tmp_path / "list.parquet", "parquet", [
        {"link": "http://example.com/a.jpg", "text": "a cat on a mat", "label": 3, "key": "theirs"}])
    source = read_source(SourceConfig(path=str(path), url_col="link", caption_col="text"))
    assert source.table.column_names == ["row", "url", "caption", "label"]
    assert source.dropped == ["key"], "a column named like one mmpipe writes is not carried"


def test_extra_column_colliding_with_ours_is_an_error(tmp_path):
    path = _write(tmp_path / "list.parquet", "parquet", [{"url": "http://e.com/a.jpg", "caption": "a b", "sha256": "x"}])
    with pytest.raises(SchemaError, match="'sha256' collides"):
        read_source(SourceConfig(path=str(path), extra_cols=["sha256"]))


def test_unknown_extension_asks_for_a_format(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("http://example.com/a.jpg\n")
    with pytest.raises(ValueError, match="source.format"):
        read_source(SourceConfig(path=str(path)))


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"url": "http://e.com/a.jpg", "caption": "a b"}\n{"url": oops}\n')
    with pytest.raises(ValueError, match=r"list.jsonl line 2: not valid JSON"):
        read_source(SourceConfig(path=str(path)))


def _rejected(path, fmt="csv"):
    source = read_source(SourceConfig(path=str(path), format=fmt))
    rejects = Rejects()
    kept = precheck(source, GuardConfig(), rejects)
    return source, kept, rejects


def test_non_utf8_captions_reject_the_row_not_the_file(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_bytes(b"url,caption\nhttp://e.com/1.jpg,caf\xe9 au lait\nhttp://e.com/2.jpg,a cup of tea\n")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_bytes(b'{"url": "http://e.com/1.jpg", "caption": "caf\xe9 au lait"}\n'
                      b'{"url": "http://e.com/2.jpg", "caption": "a cup of tea"}\n')
    for path, fmt in ((csv, "csv"), (jsonl, "jsonl")):
        source, kept, rejects = _rejected(path, fmt)
        assert rejects.table().to_pylist()[0]["reason"] == "caption_not_utf8"
        assert kept.column("caption").to_pylist() == ["a cup of tea"]


def test_precheck_counts_every_row_once(tmp_path):
    rows = [
        {"url": "http://e.com/1.jpg", "caption": "a red circle"},
        {"url": "http://e.com/1.jpg", "caption": "the same url again"},
        {"url": "file:///etc/passwd", "caption": "a secret"},
        {"url": "not a url", "caption": "a broken link"},
        {"url": "http://e.com/2.jpg", "caption": "   "},
        {"url": "http://e.com/3.jpg", "caption": None},
        {"url": None, "caption": "no url at all"},
        {"url": "http://e.com/4.jpg", "caption": "  a blue square  "},
    ]
    source, kept, rejects = _rejected(_write(tmp_path / "list.parquet", "parquet", rows), "parquet")
    assert {r["row"]: r["reason"] for r in rejects.table().to_pylist()} == {
        1: "duplicate_url", 2: "scheme_not_allowed", 3: "malformed_url", 4: "caption_empty",
        5: "caption_empty", 6: "malformed_url"}
    assert kept.column("row").to_pylist() == [0, 7]
    assert kept.column("caption").to_pylist() == ["a red circle", "a blue square"]
    assert kept.num_rows + len(rejects) == source.table.num_rows
