"""Dataset versions: curated shards + tokenizer + manifest.json, written atomically and verifiable.

Layout of a version directory:
  manifest.json          id (content hash), counts, per-file sha256, filter statistics, config
  shards/{split}-NNNNN.parquet   curated rows (schema.CURATED_FIELDS + extras), source order
  tokenizer.json         BPE trained on the train split's captions
  rejects.parquet        every rejected source row with its reason and detail

A version is a local directory or a prefix in a bucket (mmcore/storage.py); either way it counts only
once its manifest, written last, is there and verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmcore import storage
from mmcore.data.config import SplitConfig
from mmcore.data.conversations import stored_turns
from mmcore.data.schema import SCHEMA_VERSION, SPLITS, SchemaError, curated_schema, read_shard
from mmcore.data.tokenizer import load_tokenizer

MANIFEST = "manifest.json"


def url_key(url: str) -> str:
    """Stable row key: the same URL gets the same key (and split) in every version."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]


def assign_split(key: str, cfg: SplitConfig) -> str:
    """Deterministic split from a hash of the key."""
    draw = int(hashlib.sha256(f"{cfg.salt}:{key}".encode()).hexdigest()[:8], 16) / 2**32
    if draw < cfg.test_fraction:
        return "test"
    if draw < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def file_digest(path) -> dict:
    return {"sha256": storage.sha256(path), "bytes": path.stat().st_size}


class ShardWriter:
    """Writes kept rows into per-split shards of `rows_per_shard` rows under root/shards."""

    def __init__(self, root: Path, extras: pa.Schema, rows_per_shard: int, split: SplitConfig, by_id: bool = False):
        self.root, self.rows_per_shard, self.split, self.by_id = root, rows_per_shard, split, by_id
        """by_id: rows are conversations, keyed by their image and their `id`; those about one image share its
        split."""
        self.schema = curated_schema(extras)
        self.extras = extras.names
        self.pending: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
        self.written: list[dict] = []
        self.train_captions: list[str] = []
        (root / "shards").mkdir(parents=True)

    def write(self, rows: pa.Table) -> None:
        """rows: row, url, caption, image, width, height, sha256 and the extras."""
        urls = rows.column("url").to_pylist()
        image_keys = [url_key(url) for url in urls]
        splits = [assign_split(key, self.split) for key in image_keys]
        keys = [url_key(f"{url}#{i}") for url, i in zip(urls, rows.column("id").to_pylist())] if self.by_id \
            else image_keys
        table = pa.table({
            "key": keys, "url": rows.column("url"), "caption": rows.column("caption"),
            "image": rows.column("image"), "width": rows.column("width"), "height": rows.column("height"),
            "sha256": rows.column("sha256"), "split": splits,
            **{name: rows.column(name) for name in self.extras},
        }).cast(self.schema)
        for name in SPLITS:
            part = table.filter(pc.equal(table.column("split"), name))
            if part.num_rows:
                self.pending[name].append(part)
        self.train_captions += [c for c, s in zip(rows.column("caption").to_pylist(), splits) if s == "train"]
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        for name, parts in self.pending.items():
            table = pa.concat_tables(parts) if parts else self.schema.empty_table()
            while table.num_rows >= self.rows_per_shard or (final and table.num_rows):
                self._write_shard(name, table.slice(0, self.rows_per_shard))
                table = table.slice(self.rows_per_shard)
            self.pending[name] = [table] if table.num_rows else []

    def _write_shard(self, split: str, table: pa.Table) -> None:
        index = sum(1 for shard in self.written if shard["split"] == split)
        relpath = f"shards/{split}-{index:05d}.parquet"
        pq.write_table(table, self.root / relpath, row_group_size=256)
        self.written.append({"path": relpath, "split": split, "rows": table.num_rows,
                             **file_digest(self.root / relpath)})

    def close(self) -> list[dict]:
        self._flush(final=True)
        return self.written


class DataCard:
    """What `mmpipe dataset show` reports beyond the counts, gathered as the kept rows are written (histograms:
    memory does not grow with the rows): words per caption, or turns per conversation and words per answer."""

    def __init__(self, kind: str):
        self.kind = kind
        self.histograms: dict[str, Counter[int]] = {}

    def add(self, rows: pa.Table) -> None:
        if self.kind == "instructions":
            for text in rows.column("conversations").to_pylist():
                turns = stored_turns(text)
                self.histograms.setdefault("turns_per_conversation", Counter())[len(turns)] += 1
                self.histograms.setdefault("words_per_answer", Counter()).update(
                    len(answer.split()) for _, answer, _ in turns)
        else:
            self.histograms.setdefault("words_per_caption", Counter()).update(
                len(caption.split()) for caption in rows.column("caption").to_pylist())

    def summary(self, languages: Counter[str] | None = None) -> dict:
        """{kind, <histogram>: {min, median, p90, max}, languages: {code: rows}} for the manifest."""
        card = {"kind": self.kind, **{name: _spread(h) for name, h in self.histograms.items() if h}}
        return card | ({"languages": dict(languages.most_common())} if languages else {})


def _spread(histogram: Counter[int]) -> dict[str, int]:
    values = sorted(histogram)
    cumulative = np.cumsum([histogram[v] for v in values])

    def quantile(q: float) -> int:
        return int(values[int(np.searchsorted(cumulative, q * cumulative[-1]))])
    return {"min": values[0], "median": quantile(0.5), "p90": quantile(0.9), "max": values[-1]}


def content_id(files: dict[str, dict]) -> str:
    """The dataset id: a hash over every data file's path and sha256."""
    listing = json.dumps(sorted((path, entry["sha256"]) for path, entry in files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def build_manifest(root: Path, shards: list[dict], stats: dict, source: dict, config: dict,
                   schema: pa.Schema, tokenizer_vocab: int, card: dict | None = None) -> dict:
    files = {shard["path"]: {k: shard[k] for k in ("sha256", "bytes")} for shard in shards}
    for name in ("tokenizer.json", "rejects.parquet"):
        files[name] = file_digest(root / name)
    splits = {name: sum(s["rows"] for s in shards if s["split"] == name) for name in SPLITS}
    return {
        "id": content_id(files),
        "schema_version": SCHEMA_VERSION,
        "schema": [{"name": f.name, "type": str(f.type)} for f in schema],
        "rows": stats,
        "splits": splits,
        "shards": shards,
        "files": files,
        "tokenizer": {"path": "tokenizer.json", "vocab_size": tokenizer_vocab},
        "source": source,
        "config": config,
        **({"card": card} if card else {}),
    }


class DatasetError(ValueError):
    """A dataset version that is missing, incomplete or fails verification."""


@dataclass
class DatasetVersion:
    """An opened dataset version (read-only)."""

    path: Path
    """A local Path, or a path object over a bucket (storage.path)."""
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "DatasetVersion":
        storage.check(path)
        path = storage.path(path)
        if not path.is_dir():
            raise DatasetError(f"{path}: no dataset version here (not a directory)")
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise DatasetError(f"{path}: no {MANIFEST}; not a dataset version, or an ingest that never finished")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetError(f"{manifest_path}: not valid JSON ({err})") from None
        for key in ("id", "shards", "files", "rows", "splits"):
            if key not in manifest:
                raise DatasetError(f"{manifest_path}: missing field {key!r}")
        return cls(path, manifest)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def kind(self) -> str:
        """captions (image-text pairs) or instructions (conversations about images)."""
        return self.manifest.get("source", {}).get("kind", "captions")

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["path"]

    def shard_paths(self, split: str | None = None) -> list[Path]:
        return [self.path / s["path"] for s in self.manifest["shards"] if split in (None, s["split"])]

    def read(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """One split as a table, every shard schema-checked (for evaluation and tests; training streams)."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {SPLITS}")
        tables = [read_shard(path, columns) for path in self.shard_paths(split)]
        if not tables:
            raise DatasetError(f"{self.path}: split {split!r} has no rows")
        return pa.concat_tables(tables)

    def verify(self) -> list[str]:
        """Every problem found, each naming its file; an empty list means the version is intact."""
        problems = []
        for relpath, entry in self.manifest["files"].items():
            path = self.path / relpath
            if not path.exists():
                problems.append(f"{path}: missing")
            elif file_digest(path) != {"sha256": entry["sha256"], "bytes": entry["bytes"]}:
                problems.append(f"{path}: sha256 or size differs from the manifest")
        for shard in self.manifest["shards"]:
            path = self.path / shard["path"]
            if path.exists():
                problems += _check_shard(path, shard)
        if content_id(self.manifest["files"]) != self.id:
            problems.append(f"{self.path / MANIFEST}: id does not match the files it lists")
        stats = self.manifest["rows"]
        if stats["in"] != stats["kept"] + sum(stats["rejected"].values()):
            problems.append(f"{self.path / MANIFEST}: rows in != kept + rejected")
        if stats["kept"] != sum(s["rows"] for s in self.manifest["shards"]):
            problems.append(f"{self.path / MANIFEST}: kept rows != rows in shards")
        if self.tokenizer_path.exists():
            try:
                load_tokenizer(self.tokenizer_path)
            except ValueError as err:
                problems.append(str(err))
        return problems


def _check_shard(path: Path, entry: dict) -> list[str]:
    try:
        table = read_shard(path, columns=["key", "split"])
    except SchemaError as err:
        return [str(err)]
    problems = []
    if table.num_rows != entry["rows"]:
        problems.append(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
    if set(table.column("split").to_pylist()) - {entry["split"]}:
        problems.append(f"{path}: rows of another split than {entry['split']!r}")
    return problems
