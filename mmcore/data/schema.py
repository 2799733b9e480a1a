"""The curated shard schema (pinned) and reading shards with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")

# Every curated shard has these columns first, with these types; extra columns follow.
CURATED_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),  # stable row id: a hash of the URL
    pa.field("url", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # encoded bytes (download.encode_format)
    pa.field("width", pa.int32(), nullable=False),  # of the stored image
    pa.field("height", pa.int32(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),  # of the stored image bytes
    pa.field("split", pa.string(), nullable=False),
]
CURATED_NAMES = [f.name for f in CURATED_FIELDS]


class SchemaError(ValueError):
    """A shard or URL list whose columns do not match what mmpipe expects."""


def curated_schema(extras: pa.Schema | None = None) -> pa.Schema:
    """The pinned fields followed by the dataset's extra columns."""
    return pa.schema(CURATED_FIELDS + list(extras or []))


def check_schema(schema: pa.Schema, where: str | Path) -> None:
    """Raise SchemaError naming `where` if a pinned column is missing or has the wrong type."""
    for expected in CURATED_FIELDS:
        index = schema.get_field_index(expected.name)
        if index < 0:
            raise SchemaError(f"{where}: missing column {expected.name!r} (has {schema.names})")
        actual = schema.field(index).type
        if actual != expected.type:
            raise SchemaError(f"{where}: column {expected.name!r} has type {actual}, expected {expected.type}")


def open_shard(path: str | Path) -> pq.ParquetFile:
    """Open one curated shard and validate its schema (footer only); errors name the file."""
    try:
        parquet = pq.ParquetFile(str(path))  # pyarrow reads s3:// itself
    except FileNotFoundError:
        raise SchemaError(f"{path}: shard file is missing") from None
    except (pa.ArrowException, OSError) as err:
        raise SchemaError(f"{path}: not a readable Parquet file ({err})") from None
    check_schema(parquet.schema_arrow, path)
    return parquet


def read_shard(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read one curated shard, validating its schema; errors name the file."""
    parquet = open_shard(path)
    try:
        return parquet.read(columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise SchemaError(f"{path}: corrupt Parquet data ({err})") from None
