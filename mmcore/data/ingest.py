"""ingest(cfg) -> DatasetVersion: URL list -> checks -> img2dataset -> filters -> dataset version."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from mmcore import storage
from mmcore.config import project_home, to_dict
from mmcore.data.config import IngestConfig
from mmcore.console import say
from mmcore.data.dataset import MANIFEST, DataCard, DatasetVersion, ShardWriter, build_manifest
from mmcore.data.download import download
from mmcore.data.filters import Filter, LanguageFilter, build_filters, run_filters
from mmcore.data.reasons import classify_download_error
from mmcore.data.source import REJECTS_SCHEMA, ROWS_AT_A_TIME, Rejects, Source, precheck, read_source
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
    # Arrow's default pool (mimalloc) keeps the pages of every shard read and filtered.
    pa.set_memory_pool(pa.system_memory_pool())
    for location in (cfg.out, cfg.work_dir or "", cfg.source.images or ""):
        storage.check(location)  # a bucket that cannot be used fails here, before any download
    try:
        lock = ingest_lock(cfg.out).acquire()
    except Timeout:
        raise FileExistsError(f"another mmpipe ingest is building {cfg.out} on this machine; wait for it to "
                              "finish (then this version exists) or choose another --out") from None
    with lock:
        return _ingest(cfg, extra_filters)


def ingest_lock(out: str) -> FileLock:
    """Held while `out` is built, so that a second ingest into it on this machine (a second click on Run) fails
    at once instead of sharing its downloads. The operating system lets go when the process dies."""
    key = out if storage.is_remote(out) else str(Path(out).resolve())
    path = project_home() / "locks" / f"ingest-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path, timeout=0)


def _ingest(cfg: IngestConfig, extra_filters: Sequence[Filter]) -> DatasetVersion:
    out = storage.path(cfg.out)
    if (out / MANIFEST).exists() if storage.is_remote(cfg.out) else out.exists():
        raise FileExistsError(f"{cfg.out} already exists; dataset versions are immutable, choose another --out")
    work = storage.path(cfg.work_dir or f"{cfg.out}.partial")
    source = read_source(cfg.source)
    say(f"ingesting {source.table.num_rows} {'conversations' if source.kind == 'instructions' else 'rows'} of "
        f"{source.path} into {cfg.out} (downloads in {work})")
    rejects = Rejects()
    todo = precheck(source, cfg.guard, rejects)
    _trim_heap()
    raw_dir = download(todo, work / "raw", cfg.download, cfg.guard, source.sha256, cfg.source.images)
    chain = list(build_filters(cfg.filters, source.kind)) + list(extra_filters)
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


def _trim_heap() -> None:
    """Hand freed heap back to the system (after checking the list, after each downloaded shard): glibc keeps
    it, fragmented, and the language detector's allocator does not reuse it, so without this the peak grows
    with the list."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build(staging: Path, cfg: IngestConfig, source: Source, todo: pa.Table, raw_dir,
           rejects: Rejects, chain: list[Filter]) -> None:
    """Filter, split, shard, tokenize, then write the manifest last."""
    extras = source.table.select(source.extras).schema
    writer = ShardWriter(staging, extras, cfg.rows_per_shard, cfg.split, by_id=source.kind == "instructions")
    chunks = _raw_chunks(raw_dir, todo, source, rejects, cfg.download.encode_format)
    before, kept, card = len(rejects), 0, DataCard(source.kind)
    with progress_bar("filtering", total=todo.num_rows) as advance_to:
        for chunk in run_filters(chunks, chain, rejects):
            writer.write(chunk)
            card.add(chunk)
            kept += chunk.num_rows
            advance_to(kept + len(rejects) - before)
    shards = writer.close()
    if not writer.train_captions:
        raise ValueError(f"{cfg.source.path}: no row survived download and filtering into the train split; "
                         f"rejections: {rejects.counts()}")
    tokenizer = train_tokenizer(writer.train_captions, cfg.tokenizer)
    tokenizer.save(str(staging / "tokenizer.json"))
    _write_rejects(staging / "rejects.parquet", rejects, source)
    stats = _stats(source, shards, rejects)
    source_info = {"path": source.path, "kind": source.kind, "format": source.format, "sha256": source.sha256,
                   "url_col": cfg.source.url_col, "caption_col": cfg.source.caption_col,
                   "extras": source.extras, "dropped_columns": source.dropped}
    languages = next((f.detected for f in chain if isinstance(f, LanguageFilter)), None)
    manifest = build_manifest(staging, shards, stats, source_info, to_dict(cfg), writer.schema,
                              tokenizer.get_vocab_size(), card.summary(languages))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _raw_chunks(raw_dir, todo: pa.Table, source: Source, rejects: Rejects,
                image_column: str) -> Iterator[pa.Table]:
    """img2dataset's shards in source-row order: failures go to `rejects`, successes are yielded."""
    seen = np.zeros(source.table.num_rows, bool)
    columns = ["row", "url", "caption", "status", "error_message", image_column, "width", "height"]
    for path in sorted(raw_dir.glob("[0-9]*.parquet")):
        table = pq.read_table(str(path), columns=columns).sort_by("row")
        ok = []
        for index, (row, status, message) in enumerate(zip(
                table.column("row").to_pylist(), table.column("status").to_pylist(),
                table.column("error_message").to_pylist())):
            seen[row] = True
            if status == "success":
                ok.append(index)
            else:
                rejects.add(row, *classify_download_error(message))
        if ok:
            yield _candidates(table.take(ok), source, image_column)
        del table
        _trim_heap()
    for row in todo.column("row").to_pylist():
        if not seen[row]:
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


def _as_text(column: pa.Array) -> pa.Array:
    """Text as it is; anything else as text (csv and jsonl lists keep url and caption as raw bytes: bad bytes
    become U+FFFD)."""
    if pa.types.is_string(column.type):
        return column
    return pa.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else None if v is None else str(v)
                     for v in column.to_pylist()], pa.string())


def _write_rejects(path: Path, rejects: Rejects, source: Source) -> None:
    """rejects.parquet: each rejected row with its url, caption and extras, written a slice at a time."""
    schema = pa.schema([REJECTS_SCHEMA.field("row"), ("url", pa.string()), ("caption", pa.string()),
                        REJECTS_SCHEMA.field("reason"), REJECTS_SCHEMA.field("detail"),
                        *(source.table.schema.field(name) for name in source.extras)])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in rejects.table().to_batches(max_chunksize=ROWS_AT_A_TIME):
            picked = source.table.take(batch.column("row"))
            writer.write_table(pa.table({
                "row": batch.column("row"),
                "url": _as_text(picked.column("url").combine_chunks()),
                "caption": _as_text(picked.column("caption").combine_chunks()),
                "reason": batch.column("reason"),
                "detail": batch.column("detail"),
                **{name: picked.column(name) for name in source.extras},
            }, schema=schema))
