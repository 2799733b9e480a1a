"""Reading URL lists (parquet / csv / jsonl) and the checks made before any download."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mmcore.data.config import GuardConfig, SourceConfig
from mmcore.data.conversations import IMAGES_SCHEME, read_conversations
from mmcore.data.schema import CURATED_NAMES, SchemaError
from mmcore.data.urlguard import FetchError, check_url

# Columns mmpipe or img2dataset write themselves; a source column with one of these names is not carried.
RESERVED = set(CURATED_NAMES) | {"row", "status", "error_message", "original_width", "original_height",
                                 "exif", "md5", "sha512", "txt", "jpg", "png", "webp"}


ROWS_AT_A_TIME = 8192  # rows Python handles at once in the checks and the rejects (each a batch)


class Rejects:
    """Rows that will not reach the dataset, each with a reason (reasons.REASONS) and a detail.

    Kept as Arrow batches, tens of bytes a row, not as Python objects: a long URL list whose rows are
    mostly rejected (copies of the same images) does not grow the process by a kilobyte a row.
    A row rejected twice is a bug the ingest's row count check catches (in != kept + rejected).
    """

    def __init__(self):
        self._batches: list[pa.RecordBatch] = []
        self._pending: tuple[list, list, list] = ([], [], [])
        self._counts: Counter[str] = Counter()

    def add(self, row: int, reason: str, detail: str) -> None:
        for column, value in zip(self._pending, (row, reason, detail)):
            column.append(value)
        self._counts[reason] += 1
        if len(self._pending[0]) >= ROWS_AT_A_TIME:
            self._flush()

    def _flush(self) -> None:
        rows, reasons, details = self._pending
        if rows:
            self._batches.append(pa.record_batch([pa.array(rows, pa.int64()), pa.array(reasons, pa.string()),
                                                  pa.array(details, pa.string())], schema=REJECTS_SCHEMA))
            self._pending = ([], [], [])

    def __len__(self) -> int:
        return self._counts.total()

    def counts(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    def table(self) -> pa.Table:
        """Every rejected row (row, reason, detail), in row order."""
        self._flush()
        return pa.Table.from_batches(self._batches, REJECTS_SCHEMA).sort_by("row")


REJECTS_SCHEMA = pa.schema([("row", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])


@dataclass
class Source:
    """A URL list read into memory: `table` has row, url, caption and the extra columns."""

    table: pa.Table
    path: str
    format: str
    sha256: str
    extras: list[str]
    dropped: list[str]
    """Source columns not carried because mmpipe reserves their names."""
    kind: str = "captions"
    """SourceConfig.kind: captions, or instructions (a conversation file; rows keyed by their id)."""
    invalid: list[tuple[int, str, str]] = field(default_factory=list)
    """Rows rejected while reading (row, reason, detail): a conversation file's bad rows."""


def infer_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    formats = {"parquet": "parquet", "csv": "csv", "jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl"}
    if suffix not in formats:
        raise ValueError(f"{path}: cannot tell the format from the extension; set source.format "
                         "to parquet, csv or jsonl")
    return formats[suffix]


def _files(path: Path, fmt: str | None) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"URL list {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if fmt:
        files = [p for p in files if infer_format(p) == fmt]
    if not files:
        raise ValueError(f"{path}: directory holds no URL list files")
    return files


def _read_jsonl(path: Path, cfg: SourceConfig) -> pa.Table:
    """JSON lines, one object per line. url and caption are kept as raw bytes (invalid UTF-8
    rejects the row later); other text columns get U+FFFD for bad bytes."""
    raw_columns = (cfg.url_col, cfg.caption_col)
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.decode("utf-8", errors="surrogateescape").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append({k: _jsonl_cell(v, k in raw_columns) for k, v in record.items()})
    if not records:
        return pa.table({})
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        column = next((f"column {name!r}" for name in {k for r in records for k in r} if _mixed(records, name)),
                      "a column")
        raise ValueError(f"{path}: {column} holds values of different types on different lines ({err})") from None


def _mixed(records: list[dict], name: str) -> bool:
    """Whether the values of `name` cannot share one Arrow type."""
    try:
        pa.array([r.get(name) for r in records])
        return False
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return True


def _jsonl_cell(value, raw: bool):
    if not isinstance(value, str):
        return value
    data = value.encode("utf-8", "surrogateescape")
    return data if raw else data.decode("utf-8", "replace")


def _read_file(path: Path, fmt: str, cfg: SourceConfig) -> pa.Table:
    if fmt == "parquet":
        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    if fmt == "csv":
        # url and caption as raw bytes: a bad byte in one row rejects that row, not the file.
        options = pacsv.ConvertOptions(column_types={cfg.url_col: pa.binary(), cfg.caption_col: pa.binary()})
        try:
            return pacsv.read_csv(path, convert_options=options)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path}: cannot parse as CSV ({err})") from None
    return _read_jsonl(path, cfg)


def _check_columns(table: pa.Table, path: Path, cfg: SourceConfig) -> None:
    for role, name in (("url", cfg.url_col), ("caption", cfg.caption_col)):
        if name not in table.column_names:
            raise SchemaError(f"{path}: no {role} column {name!r} (columns: {table.column_names}); "
                              f"set source.{role}_col")
    for name in cfg.extra_cols or []:
        if name not in table.column_names:
            raise SchemaError(f"{path}: extra column {name!r} not found (columns: {table.column_names})")
        if name in RESERVED:
            raise SchemaError(f"{path}: extra column {name!r} collides with a column mmpipe writes; rename it")


def file_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def source_sha256(cfg: SourceConfig) -> str:
    """The sha256 of the URL list's files (what a dataset manifest records as `source.sha256`)."""
    return file_sha256(_files(Path(cfg.path), cfg.format))


def read_source(cfg: SourceConfig) -> Source:
    """Read the URL list; missing columns fail here, naming the column and the file."""
    cfg.validate()
    root = Path(cfg.path)
    if cfg.kind == "instructions":
        return _read_instructions(root, cfg)
    files = _files(root, cfg.format)
    fmt = cfg.format or infer_format(files[0])
    tables = []
    for path in files:
        table = _read_file(path, fmt, cfg)
        _check_columns(table, path, cfg)
        tables.append(table)
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"{root}: the files' columns do not agree ({err})") from None
    others = [c for c in table.column_names if c not in (cfg.url_col, cfg.caption_col)]
    extras = cfg.extra_cols if cfg.extra_cols is not None else [c for c in others if c not in RESERVED]
    dropped = [c for c in others if c not in extras]
    columns = {"row": pa.array(range(table.num_rows), pa.int64()),
               "url": table.column(cfg.url_col), "caption": table.column(cfg.caption_col)}
    columns.update({name: table.column(name) for name in extras})
    return Source(table=pa.table(columns), path=str(root), format=fmt, sha256=file_sha256(files),
                  extras=list(extras), dropped=dropped)


def _read_instructions(root: Path, cfg: SourceConfig) -> Source:
    """A conversation file (or a directory of them, rows numbered across the files in name order)."""
    files = _files(root, cfg.format)
    tables, invalid = [], []
    for path in files:
        offset = sum(t.num_rows for t in tables)
        table, rejected = read_conversations(path, cfg)
        tables.append(table.set_column(0, "row", pa.array(range(offset, offset + table.num_rows), pa.int64())))
        invalid += [(offset + row, reason, detail) for row, reason, detail in rejected]
    return Source(table=pa.concat_tables(tables), path=str(root), format="json", sha256=file_sha256(files),
                  extras=["id", "conversations"], dropped=[], kind="instructions", invalid=invalid)


def _text(value) -> str | None:
    """A cell as text; raises UnicodeDecodeError for bytes that are not UTF-8."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def precheck(source: Source, guard: GuardConfig, rejects: Rejects) -> pa.Table:
    """Reject rows with a bad URL, a bad caption or a repeated URL (a conversation file's rows: those its
    reader rejected, then a bad URL; several conversations may share an image); return the rest (row, url,
    caption).

    Python sees one batch of rows at a time and repeated URLs are found by Arrow, so a long list costs its
    Arrow columns, not a Python string per URL.
    """
    table = source.table.select(["row", "url", "caption"])
    if source.invalid:
        for row, reason, detail in source.invalid:
            rejects.add(row, reason, detail)
        valid = np.ones(table.num_rows, bool)
        valid[[row for row, _, _ in source.invalid]] = False
        table = table.filter(pa.array(valid))
    checked = pa.Table.from_batches([_check_batch(batch, guard, rejects, source.kind == "instructions")
                                     for batch in table.to_batches(max_chunksize=ROWS_AT_A_TIME)], TODO_SCHEMA)
    return checked if source.kind == "instructions" else _drop_repeated_urls(checked, rejects)


TODO_SCHEMA = pa.schema([("row", pa.int64()), ("url", pa.string()), ("caption", pa.string())])


def _check_batch(batch: pa.RecordBatch, guard: GuardConfig, rejects: Rejects, local_images: bool) -> pa.RecordBatch:
    rows, urls, captions = [], [], []
    for row, url, caption in zip(*(column.to_pylist() for column in batch.columns)):
        try:
            url = _text(url)
            if not (local_images and url.startswith(f"{IMAGES_SCHEME}:")):  # a path under source.images
                check_url(url, guard)
        except UnicodeDecodeError:
            rejects.add(row, "malformed_url", "the URL is not valid UTF-8")
            continue
        except FetchError as err:
            rejects.add(row, err.reason, err.detail)
            continue
        try:
            caption = (_text(caption) or "").strip()
        except UnicodeDecodeError as err:
            rejects.add(row, "caption_not_utf8", f"invalid byte at position {err.start}")
            continue
        if not caption:
            rejects.add(row, "caption_empty", "the caption is missing or blank")
            continue
        rows.append(row)
        urls.append(url)
        captions.append(caption)
    return pa.record_batch([pa.array(rows, pa.int64()), pa.array(urls, pa.string()),
                            pa.array(captions, pa.string())], schema=TODO_SCHEMA)


def _drop_repeated_urls(table: pa.Table, rejects: Rejects) -> pa.Table:
    """Keep the first row of each URL; the later ones are rejected naming it."""
    urls = table.column("url")
    distinct = pc.index_in(urls, value_set=pc.unique(urls)).to_numpy()  # numbered in order of first appearance
    first = np.unique(distinct, return_index=True)[1]  # the position of each URL's first row
    repeated = np.ones(len(distinct), bool)
    repeated[first] = False
    rows = table.column("row").to_numpy()
    for position in np.flatnonzero(repeated):
        rejects.add(int(rows[position]), "duplicate_url", f"same URL as row {rows[first[distinct[position]]]}")
    return table.filter(pa.array(~repeated))
