"""Real img2dataset downloads from a loopback server: a planted bad row for every failure mode."""

from __future__ import annotations

import collections
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcore.data.config import DownloadConfig, GuardConfig, IngestConfig, SourceConfig
from mmcore.data.dataset import assign_split
from mmcore.data.ingest import ingest
from mmcore.data.synthetic.corpus import SampleSpec, make_sample
from mmcore.data.schema import CURATED_NAMES
from mmcore.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

# /bad/<route> of tests/conftest.py -> the reason ingest must give (None: must be kept)
SPECIAL_ROUTES = {
    "server-error": "http_error",
    "slow": "timeout",
    "drip": "timeout",
    "reset": "connection_error",
    "html-typed": "not_an_image",
    "robots": "robots_optout",
    "big": "too_large",
    "big-chunked": "too_large",
    "redirect-ok": None,
    "redirect-blocked": "blocked_network",
    "redirect-metadata": "blocked_network",
    "redirect-file": "scheme_not_allowed",
    "redirect-loop": "http_error",
}


def _csv_url_list(sample_list: Path, base_url: str, out: Path) -> Path:
    """The sample corpus as CSV, plus the misbehaving routes and a caption that is not UTF-8."""
    buffer = io.BytesIO()
    table = pq.read_table(sample_list)
    pacsv.write_csv(table, buffer)
    lines = [buffer.getvalue()]
    blanks = "," * (len(table.column_names) - 3)  # url, caption, source ... defect
    for route, defect in SPECIAL_ROUTES.items():
        caption = "a plain green picture" if defect is None else "a red circle left of a blue square"
        lines.append(f'"{base_url}/bad/{route}","{caption}","special"{blanks}"{defect or ""}"\n'.encode())
    lines.append(f'"{base_url}/images/photos/coffee.jpg?latin1","caf\xe9 au lait","special"{blanks}'
                 f'"caption_not_utf8"\n'.encode("latin-1"))
    out.write_bytes(b"".join(lines))
    return out


def _config(url_list: Path, out: Path, **overrides) -> IngestConfig:
    return IngestConfig(
        source=SourceConfig(path=str(url_list)), out=str(out), rows_per_shard=128,
        guard=GuardConfig(allow_networks=["127.0.0.1/32"], max_bytes=250_000, deadline_s=2.0),
        download=DownloadConfig(timeout_s=1.0, retries=0, threads=16, samples_per_shard=200),
        **overrides,
    )


@pytest.fixture(scope="module")
def corpus(served_dir):
    server, root = served_dir
    sample_list = make_sample(root, server.url, SampleSpec(synthetic=300, digits=200, seed=1))
    return server, _csv_url_list(sample_list, server.url, root / "urls.csv")


INGEST_SECONDS = {}


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory):
    _, url_list = corpus
    started = time.monotonic()
    version = ingest(_config(url_list, tmp_path_factory.mktemp("ds") / "v1"))
    INGEST_SECONDS["v1"] = time.monotonic() - started
    return version


def _source_rows(url_list: Path) -> int:
    return pacsv.read_csv(url_list, convert_options=pacsv.ConvertOptions(
        column_types={"caption": pa.binary()})).num_rows


def test_counts_add_up(dataset, corpus):
    rows = dataset.manifest["rows"]
    rejects = pq.read_table(dataset.path / "rejects.parquet")
    assert rows["in"] == _source_rows(corpus[1])
    assert rows["in"] == rows["kept"] + sum(rows["rejected"].values())
    assert rows["rejected"] == dict(collections.Counter(rejects.column("reason").to_pylist()))
    assert rows["kept"] == sum(dataset.manifest["splits"].values())


@pytest.mark.fault
def test_every_planted_defect_is_rejected_for_its_reason(dataset, fault):
    rejects = pq.read_table(dataset.path / "rejects.parquet").to_pylist()
    planted = [r for r in rejects if r["defect"]]
    wrong = [(r["url"], r["defect"], r["reason"], r["detail"]) for r in planted if r["reason"] != r["defect"]]
    assert not wrong
    expected = {d for d in SPECIAL_ROUTES.values() if d} | {"caption_not_utf8", "language", "exact_duplicate",
                                                            "near_duplicate", "too_many_pixels", "empty_body",
                                                            "truncated_image", "duplicate_url", "malformed_url"}
    assert expected <= {r["reason"] for r in planted}
    hostile = {r["url"].rsplit("/", 1)[1]: r["reason"] for r in planted if "/bad/" in r["url"]}
    fault("hostile-web", "loopback routes: reset mid-body, 20 bytes/s drip, 3 s stall, endless redirects, "
          "redirects to private/metadata/file URLs, oversize bodies", len(hostile),
          f"only the hostile rows, each under its reason ({', '.join(sorted(set(hostile.values())))}); "
          f"ingest of {dataset.manifest['rows']['in']} rows took {INGEST_SECONDS['v1']:.0f} s (2 s body deadline)")


def test_clean_rows_are_only_dropped_as_real_near_duplicates(dataset):
    """The only clean rows dropped are digits whose near-twin is the same digit."""
    rejects = pq.read_table(dataset.path / "rejects.parquet").to_pylist()
    labels = {}
    for split in ("train", "val", "test"):
        table = dataset.read(split, columns=["key", "url", "label", "split"])
        labels.update(zip(table.column("url").to_pylist(), table.column("label").to_pylist()))
    clean = [r for r in rejects if not r["defect"]]
    assert all(r["reason"] == "near_duplicate" and r["source"] == "sklearn-digits" for r in clean), clean
    for r in clean:
        twin_row = int(r["detail"].rsplit(" ", 1)[1])
        assert r["label"] is not None and twin_row < r["row"]


def test_kept_rows_match_the_pinned_schema_and_decode(dataset):
    assert dataset.verify() == []
    keys = []
    for split in ("train", "val", "test"):
        table = dataset.read(split)
        assert table.column_names[: len(CURATED_NAMES)] == CURATED_NAMES
        assert not any(table.column("defect").to_pylist())
        for row in table.slice(0, 20).to_pylist():
            with Image.open(io.BytesIO(row["image"])) as image:
                assert image.size == (64, 64) == (row["width"], row["height"])
            assert assign_split(row["key"], _split_cfg(dataset)) == split == row["split"]
        keys += table.column("key").to_pylist()
    assert len(keys) == len(set(keys))
    urls = [u for s in ("train", "val", "test") for u in dataset.read(s, ["key", "url", "split"])
            .column("url").to_pylist()]
    assert any(u.endswith("/bad/redirect-ok") for u in urls), "a redirect to an allowed host must be followed"


def _split_cfg(dataset):
    from mmcore.data.config import SplitConfig

    return SplitConfig(**dataset.manifest["config"]["split"])


def test_tokenizer_is_trained_on_the_captions(dataset):
    tokenizer = load_tokenizer(dataset.tokenizer_path)
    encoding = tokenizer.encode("two red circles left of a blue square")
    assert encoding.tokens[0] == "<bos>" and encoding.tokens[-1] == "<eos>"
    # frequent caption words are single tokens once BPE has learned them
    assert len(encoding.ids) <= 2 + 8
    assert tokenizer.decode(encoding.ids).strip() == "two red circles left of a blue square"


def test_same_list_gives_the_same_dataset_id(dataset, corpus, tmp_path):
    again = ingest(_config(corpus[1], tmp_path / "again"))
    assert again.id == dataset.id
    assert again.manifest["files"] == dataset.manifest["files"]


def test_existing_output_is_refused_before_any_download(dataset, corpus):
    server, url_list = corpus
    before = len(server.requests)
    with pytest.raises(FileExistsError, match=str(dataset.path)):
        ingest(_config(url_list, dataset.path))
    assert len(server.requests) == before


def test_a_crash_leaves_no_dataset_and_the_rerun_resumes_downloads(corpus, tmp_path):
    server, url_list = corpus
    out = tmp_path / "crashy"
    calls = []

    def failing_filter(rows):
        calls.append(rows.num_rows)
        if len(calls) == 2:
            raise RuntimeError("model-score filter crashed")
        return [None] * rows.num_rows

    with pytest.raises(RuntimeError, match="crashed"):
        ingest(_config(url_list, out), extra_filters=[failing_filter])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["crashy.partial"], "no staging dir may be left behind"
    assert list((tmp_path / "crashy.partial" / "raw").glob("*_stats.json"))

    before = len(server.requests)
    version = ingest(_config(url_list, out))
    assert version.verify() == []
    refetched = [p for p in server.requests[before:] if p.startswith("/images/")]
    assert refetched == [], "finished download shards must not be fetched again"
    assert not (tmp_path / "crashy.partial").exists()


def _mmpipe(*args, **kwargs):
    cli = Path(sys.executable).with_name("mmpipe")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=600, **kwargs)


def test_cli_missing_caption_column_fails_before_download(corpus, tmp_path):
    server, url_list = corpus
    bad = tmp_path / "no-caption.csv"
    bad.write_text(f"url,text\n{server.url}/images/photos/coffee.jpg,a cup of coffee\n")
    before = len(server.requests)
    result = _mmpipe("ingest", str(bad), "--out", str(tmp_path / "out"), "--allow-network", "127.0.0.1/32")
    assert result.returncode == 2
    assert "caption" in result.stderr and str(bad) in result.stderr
    assert not (tmp_path / "out").exists()
    assert len(server.requests) == before


def test_cli_show_and_verify(dataset, tmp_path):
    shown = _mmpipe("dataset", "show", str(dataset.path))
    assert shown.returncode == 0 and dataset.id in shown.stdout and "near_duplicate" in shown.stdout
    assert _mmpipe("dataset", "verify", str(dataset.path)).returncode == 0

    broken = tmp_path / "broken"
    shutil.copytree(dataset.path, broken)
    shard = sorted((broken / "shards").glob("train-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: os.path.getsize(shard) // 2])
    result = _mmpipe("dataset", "verify", str(broken))
    assert result.returncode == 1
    assert str(shard) in result.stdout
