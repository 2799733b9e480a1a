"""ingest(cfg) -> DatasetVersion: URL list -> checks -> img2dataset -> filters -> dataset version."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmcore import storage
from mmcore.config import IngestConfig, project_home, to_dict
from mmcore.console import say
from mmcore.data.dataset import MANIFEST, DatasetVersion, ShardWriter, build_manifest
from mmcore.data.download import download
from mmcore.data.filters import Filter, build_filters, run_filters
from mmcore.data.reasons import classify_download_error
from mmcore.data.source import Rejects, Source, precheck, read_source
from mmcore.data.tokenizer import train_tokenizer
from mmcore.disk import staged
from mmcore.progress import progress_bar


def ingest(cfg: IngestConfig, extra_filters: Sequence[Filter] = ()) -> DatasetVersion:
    """Build the dataset version `cfg.out` (a directory, or a prefix in a bucket) from the URL list `cfg.source`.

    Nothing counts at `cfg.out` until the version is complete: it is built in a hidden staging
    directory, then renamed into place on a disk, or uploaded with its manifest last to a bucket.
    Downloads live in `cfg.work_dir` (default `<out>.partial`, in the bucket too) so an interrupted run
    resumes; it is removed on success. `extra_filters` run after the configured ones (the slot for
    model-score filters).
    """
    cfg.validate()
    # Arrow's default pool (mimalloc) keeps pages of the shards read and filtered: on the system
    # allocator peak RSS grows less with the list (100,000 rows: 1.4 KiB a row over a 10,000-row
    # ingest, against 1.8; the rest is not found yet).
    pa.set_memory_pool(pa.system_memory_pool())
    for location in (cfg.out, cfg.work_dir or ""):
        storage.check(location)  # a bucket that cannot be used fails here, before any download
    out = storage.path(cfg.out)
    if (out / MANIFEST).exists() if storage.is_remote(cfg.out) else out.exists():
        raise FileExistsError(f"{cfg.out} already exists; dataset versions are immutable, choose another --out")
    work = storage.path(cfg.work_dir or f"{cfg.out}.partial")
    source = read_source(cfg.source)
    say(f"ingesting {source.table.num_rows} rows of {source.path} into {cfg.out} (downloads in {work})")
    rejects = Rejects()
    todo = precheck(source, cfg.guard, rejects)
    raw_dir = download(todo, work / "raw", cfg.download, cfg.guard, source.sha256)
    chain = list(build_filters(cfg.filters)) + list(extra_filters)
    if isinstance(out, Path):
        staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
        with staged(staging):
            _build(staging, cfg, source, todo, raw_dir, rejects, chain)
            os.rename(staging, out)
    else:
        staging = project_home() / "tmp" / f"ingest-{uuid.uuid4().hex[:8]}"
        with staged(staging):
            _build(staging, cfg, source, todo, raw_dir, rejects, chain)
            # replaces the objects of an upload that never finished: no manifest vouched for them
            with progress_bar("uploading", total=sum(1 for p in staging.rglob("*") if p.is_file())) as advance_to:
                storage.publish(staging, out, last=MANIFEST, advance_to=advance_to)
    storage.remove_tree(work)
    version = DatasetVersion.open(cfg.out)
    rows = version.manifest["rows"]
    say(f"dataset {version.id}: kept {rows['kept']} of {rows['in']} rows ({sum(rows['rejected'].values())} "
        f"rejected, reasons in {out / 'rejects.parquet'}) at {cfg.out}")
    return version


def _build(staging: Path, cfg: IngestConfig, source: Source, todo: pa.Table, raw_dir,
           rejects: Rejects, chain: list[Filter]) -> None:
    """Filter, split, shard, tokenize, then write the manifest last."""
    extras = source.table.select(source.extras).schema
    writer = ShardWriter(staging, extras, cfg.rows_per_shard, cfg.split)
    chunks = _raw_chunks(raw_dir, todo, source, rejects, cfg.download.encode_format)
    before, kept = len(rejects.by_row), 0
    with progress_bar("filtering", total=todo.num_rows) as advance_to:
        for chunk in run_filters(chunks, chain, rejects):
            writer.write(chunk)
            kept += chunk.num_rows
            advance_to(kept + len(rejects.by_row) - before)
    shards = writer.close()
    if not writer.train_captions:
        raise ValueError(f"{cfg.source.path}: no row survived download and filtering into the train split; "
                         f"rejections: {rejects.counts()}")
    tokenizer = train_tokenizer(writer.train_captions, cfg.tokenizer)
    tokenizer.save(str(staging / "tokenizer.json"))
    _write_rejects(staging / "rejects.parquet", rejects, source)
    stats = _stats(source, shards, rejects)
    source_info = {"path": source.path, "format": source.format, "sha256": source.sha256,
                   "url_col": cfg.source.url_col, "caption_col": cfg.source.caption_col,
                   "extras": source.extras, "dropped_columns": source.dropped}
    manifest = build_manifest(staging, shards, stats, source_info, to_dict(cfg), writer.schema,
                              tokenizer.get_vocab_size())
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _raw_chunks(raw_dir, todo: pa.Table, source: Source, rejects: Rejects,
                image_column: str) -> Iterator[pa.Table]:
    """img2dataset's shards in source-row order: failures go to `rejects`, successes are yielded."""
    seen = set()
    columns = ["row", "url", "caption", "status", "error_message", image_column, "width", "height"]
    for path in sorted(raw_dir.glob("[0-9]*.parquet")):
        table = pq.read_table(str(path), columns=columns).sort_by("row")
        ok = []
        for index, (row, status, message) in enumerate(zip(
                table.column("row").to_pylist(), table.column("status").to_pylist(),
                table.column("error_message").to_pylist())):
            seen.add(row)
            if status == "success":
                ok.append(index)
            else:
                rejects.add(row, *classify_download_error(message))
        if ok:
            yield _candidates(table.take(ok), source, image_column)
    for row in todo.column("row").to_pylist():
        if row not in seen:
            rejects.add(row, "download_error", "img2dataset returned no result for this row (its shard failed)")


def _candidates(table: pa.Table, source: Source, image_column: str) -> pa.Table:
    images = table.column(image_column)
    digests = [hashlib.sha256(image).hexdigest() for image in images.to_pylist()]
    extras = source.table.take(table.column("row")).select(source.extras)
    return pa.table({
        "row": table.column("row"), "url": table.column("url"), "caption": table.column("caption"),
        "image": images.cast(pa.binary()), "width": table.column("width"), "height": table.column("height"),
        "sha256": pa.array(digests, pa.string()),
        **{name: extras.column(name) for name in source.extras},
    })


def _stats(source: Source, shards: list[dict], rejects: Rejects) -> dict:
    stats = {"in": source.table.num_rows, "kept": sum(s["rows"] for s in shards), "rejected": rejects.counts()}
    if stats["in"] != stats["kept"] + sum(stats["rejected"].values()):  # a bug, never bad input
        raise RuntimeError(f"row counts do not add up: {stats}")
    return stats


def _as_text(values: list) -> list[str | None]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


def _write_rejects(path: Path, rejects: Rejects, source: Source) -> None:
    rows = sorted(rejects.by_row)
    picked = source.table.take(pa.array(rows, pa.int64()))
    table = pa.table({
        "row": pa.array(rows, pa.int64()),
        "url": pa.array(_as_text(picked.column("url").to_pylist()), pa.string()),
        "caption": pa.array(_as_text(picked.column("caption").to_pylist()), pa.string()),
        "reason": [rejects.by_row[r][0] for r in rows],
        "detail": [rejects.by_row[r][1] for r in rows],
        **{name: picked.column(name) for name in source.extras},
    })
    pq.write_table(table, path)
