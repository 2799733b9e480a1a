"""Malformed URL lists, configs and flow parameters: each gets one clear error naming the file, line, row or
field, before anything is made. The kinds are listed one by one; `hypothesis` then throws arbitrary
lines, cells and override values at the same entry points, which must answer with such an error or
succeed, never with another exception."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mmcore.cli import apply_overrides
from mmcore.config import to_dict
from mmcore.data.config import IngestConfig, SourceConfig
from mmcore.data.ingest import ingest, ingest_lock
from mmcore.data.source import read_source
from mmcore.models import model_config
from mmcore.recipes import recipe
from pipelines.params import IngestParams, RetrainParams, TrainParams


def _parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _text(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


ROWS = {"url": ["http://example.com/a.jpg"], "caption": ["a red circle"]}

# kind -> (make the URL list in a directory, the error it must raise, as a regex; {path} is the list)
URL_LISTS = {
    "missing file": (lambda d: d / "nope.parquet", r"URL list {path} does not exist"),
    "empty parquet file": (lambda d: _text(d / "l.parquet", b""), r"{path}: not a readable Parquet file"),
    "truncated parquet": (lambda d: _text(d / "l.parquet", _parquet(d / "x.parquet", **ROWS).read_bytes()[:-30]),
                          r"{path}: not a readable Parquet file"),
    "no url column": (lambda d: _parquet(d / "l.parquet", link=ROWS["url"], caption=ROWS["caption"]),
                      r"{path}: no url column 'url' \(columns: \['link', 'caption'\]\)"),
    "no caption column": (lambda d: _text(d / "l.csv", "url\nhttp://example.com/a.jpg\n"),
                          r"{path}: no caption column 'caption'"),
    "CSV rows of different widths": (lambda d: _text(d / "l.csv", "url,caption\nhttp://a/b.jpg,one,two,three\n"),
                                     r"{path}: cannot parse as CSV"),
    "JSON lines with a broken line": (lambda d: _text(d / "l.jsonl", '{"url": "u", "caption": "c"}\n{"url": \n'),
                                      r"{path} line 2: not valid JSON"),
    "JSON lines holding an array": (lambda d: _text(d / "l.jsonl", '["http://a/b.jpg", "a caption"]\n'),
                                    r"{path} line 1: expected a JSON object, got list"),
    "JSON lines whose column changes type": (
        lambda d: _text(d / "l.jsonl", '{"url": "u", "caption": "c", "w": 3}\n{"url": "v", "caption": "d", "w": {"x": 1}}\n'),
        r"{path}: .*column 'w'"),
    "unknown extension": (lambda d: _text(d / "l.txt", "http://a/b.jpg a caption\n"),
                          r"{path}: cannot tell the format from the extension; set source.format"),
    "empty directory": (lambda d: (d / "lists").mkdir() or d / "lists", r"{path}: directory holds no URL list files"),
    "directory of lists that disagree": (
        lambda d: (d / "lists").mkdir() or _parquet(d / "lists" / "a.parquet", **ROWS, w=[1])
        and _parquet(d / "lists" / "b.parquet", **ROWS, w=[{"x": 1}]) and d / "lists",
        r"{path}: the files' columns do not agree"),
    "extra column named like one mmpipe writes": (
        lambda d: _parquet(d / "l.parquet", **ROWS, split=["train"]),
        r"{path}: extra column 'split' collides with a column mmpipe writes"),
}


@pytest.mark.fault
def test_a_malformed_url_list_is_named_before_anything_is_made(tmp_path, fault):
    for number, (kind, (make, expected)) in enumerate(URL_LISTS.items()):
        folder = tmp_path / str(number)
        folder.mkdir()
        path = make(folder)
        cfg = IngestConfig(source=SourceConfig(str(path), extra_cols=["split"] if "mmpipe writes" in kind else None),
                           out=str(folder / "datasets" / "v1"))
        with pytest.raises((ValueError, FileNotFoundError), match=expected.format(path=re.escape(str(path)))):
            ingest(cfg)
        assert not (folder / "datasets").exists(), f"{kind}: made something (a version, staging or download dir)"
    fault("bad-input", f"{len(URL_LISTS)} kinds of malformed URL list through ingest(): "
          + "; ".join(URL_LISTS), len(URL_LISTS), "nothing: each refused naming the file (and line), nothing made")


RUN = recipe("debug", "some/dataset")
# kind -> (overrides of the debug recipe, the error it must raise)
OVERRIDES = {
    "an unknown field": (["optim.learning_rate=0.1"], r"--set 'optim.learning_rate=0.1': unknown field"),
    "no value": (["optim.lr"], r"--set 'optim.lr': expected field=value"),
    "a field where a section is": (["optim=3"], r"optim: expected a section of fields, got int 3"),
    "a section where a field is": (["optim.lr.x=1"], r"--set 'optim.lr.x=1': 'lr' is not a config section"),
    "text where a number is": (['data.batch_size="big"'], r"data.batch_size: expected int, got str 'big'"),
    "true where a number is": (["parallel.zero_stage=true"], r"parallel.zero_stage: expected int, got bool"),
    "a list of the wrong items": (['optim.betas=[0.9, "x"]'], r"optim.betas\[1\]: expected float, got str"),
    "a number out of range": (["parallel.zero_stage=4"], r"parallel.zero_stage"),
    "a batch of zero": (["data.batch_size=0"], r"data.batch_size"),
    "an unknown model": (['model.name="clip-huge"'], r"model.name.*clip-huge"),
    "an unknown loss": (['task.loss="triplet"'], r"task.loss"),
}


@pytest.mark.fault
def test_a_bad_training_setting_names_the_field(fault):
    for kind, (overrides, expected) in OVERRIDES.items():
        with pytest.raises(ValueError, match=expected):
            cfg = apply_overrides(RUN, overrides)
            cfg.validate()
            model_config(cfg.model.name)  # as fit() checks it, before any worker starts
    fault("bad-input", f"{len(OVERRIDES)} kinds of bad training setting (`--set`): " + "; ".join(OVERRIDES),
          len(OVERRIDES), "nothing: each refused naming the field, before any worker starts")


@pytest.mark.fault
def test_bad_ingest_settings_and_paths_name_the_field_or_path(tmp_path, fault):
    base = IngestConfig(source=SourceConfig(str(tmp_path / "l.parquet")), out=str(tmp_path / "v1"))
    for overrides, expected in [(['guard.allow_networks=["10.0.0.0/33"]'], r"guard.allow_networks"),
                                (["split.val_fraction=0.7", "split.test_fraction=0.5"], r"^split"),
                                (['download.encode_format="bmp"'], r"download.encode_format"),
                                (["tokenizer.vocab_size=10"], r"tokenizer.vocab_size: must be >= 300")]:
        with pytest.raises(ValueError, match=expected):
            apply_overrides(base, overrides).validate()
    (tmp_path / "v1").mkdir()
    _parquet(tmp_path / "l.parquet", **ROWS)
    with pytest.raises(FileExistsError, match=f"{re.escape(str(tmp_path / 'v1'))} already exists"):
        ingest(base)
    second = dataclasses.replace(base, out=str(tmp_path / "v2"))
    with ingest_lock(second.out):  # held as an ingest into v2 running in another process holds it
        with pytest.raises(FileExistsError, match=f"another mmpipe ingest is building {re.escape(second.out)}"):
            ingest(second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.parquet", "v1"]
    fault("bad-input", "4 bad ingest settings (a CIDR, split fractions over 1, an image format, a vocabulary), "
          "an --out that exists and one another ingest is building", 6,
          "nothing: each refused naming the field or the path; nothing else made")


@pytest.mark.fault
def test_bad_flow_parameters_name_the_field(fault):
    cases = [(lambda: TrainParams.model_validate({"dataset": "d", "zero_stag": 2}), "zero_stag"),
             (lambda: TrainParams(dataset="d", recipe="huge"), "recipe"),
             (lambda: TrainParams(dataset="d", num_workers=0), "num_workers"),
             (lambda: IngestParams(url_list="l.parquet", image_size=4), "image_size"),
             (lambda: IngestParams(url_list="https://t0ken@lists.example.com/l.parquet"), "url_list"),
             (lambda: RetrainParams(), "exactly one"),
             (lambda: RetrainParams(dataset="d", gate={"margin": 2}), "gate.margin")]
    for make, field in cases:
        with pytest.raises(ValidationError, match=field):
            make()
    with pytest.raises(ValueError, match="recipe debug-fusion trains the fusion stage, not contrastive"):
        TrainParams(dataset="d", recipe="debug-fusion").to_config("d")
    fault("bad-input", f"{len(cases) + 1} kinds of bad flow parameter (a misspelt field, an unknown recipe, out of "
          "range, credentials in a URI, neither source nor dataset, a recipe of another stage)", len(cases) + 1,
          "nothing: each refused naming the field")


FLAT = {f"{section}.{name}": value for section, fields in to_dict(RUN).items() if isinstance(fields, dict)
        for name, value in fields.items()}
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, width=32)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@pytest.mark.fault
def test_arbitrary_input_is_taken_or_refused_with_a_clear_error(tmp_path_factory, fault):
    """The three properties below, run under one report."""
    _any_value_for_any_training_field()
    _any_json_lines_file(tmp_path_factory)
    _any_csv_bytes(tmp_path_factory)
    fault("bad-input", "hypothesis: any JSON value for any training field (300 examples), any JSON-lines content "
          "(150), any CSV bytes after the header (150)", 600,
          "nothing: each taken, or refused with a ValueError naming the field or the file")


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(FLAT)), value=JSON)
def _any_value_for_any_training_field(field, value):
    try:
        apply_overrides(RUN, [f"{field}={json.dumps(value)}"]).validate()
    except ValueError as err:
        assert field in str(err) or field.split(".")[0] in str(err), str(err)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"url": JSON, "caption": JSON}, optional={"extra": JSON}),
    JSON, st.text(max_size=30)), max_size=6))
def _any_json_lines_file(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "l.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8", errors="surrogateescape")
    try:
        source = read_source(SourceConfig(str(path)))
    except ValueError as err:
        assert str(path) in str(err), str(err)
    else:
        text = path.read_text()
        assert source.table.num_rows == sum(bool(line.strip()) for line in text.split("\n"))


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=200))
def _any_csv_bytes(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("csv") / "l.csv"
    path.write_bytes(b"url,caption\n" + body)
    try:
        read_source(SourceConfig(str(path)))
    except ValueError as err:
        assert str(path) in str(err), str(err)
