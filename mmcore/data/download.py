"""img2dataset, driven from here: its downloader, resizer and writer, with the URL guard inside.

We build img2dataset's parts ourselves instead of calling `img2dataset.download` so that
  - its input shards are slices of the rows already in memory (its Reader reads the list again, whole),
  - every download process installs the URL guard (pool initializer) before fetching,
  - a progress bar counts images, not shards (a counting writer feeds a shared counter),
  - none of its traps apply (STACK_NOTES): no `incremental_mode="overwrite"`, no wandb,
    no SIGINT handler replaced; finished shards (those with `_stats.json`) are not fetched again.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from pathlib import Path

import pyarrow as pa

# albumentations (imported by img2dataset) checks PyPI for updates at import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import ParquetSampleWriter  # noqa: E402

from mmcore import disk, storage
from mmcore.config import to_dict
from mmcore.data.config import DownloadConfig, GuardConfig
from mmcore.data import urlguard
from mmcore.progress import progress_bar

_PROGRESS = None  # the shared row counter, set in each download process
_DISK_FULL = None  # set to 1 by a download process whose write found the disk full


def _init_worker(policy: GuardConfig, images_root: str | None, counter, disk_full) -> None:
    """Runs once in every download process, before any fetch."""
    global _PROGRESS, _DISK_FULL
    _PROGRESS, _DISK_FULL = counter, disk_full
    urlguard.install(policy, images_root)


class CountingParquetWriter(ParquetSampleWriter):
    """img2dataset's Parquet writer that also counts rows for the progress bar, and says when the disk
    is full (img2dataset only prints a failed shard's error and goes on)."""

    def write(self, img_str, key, caption, meta):
        with _noting_full_disk():
            super().write(img_str, key, caption, meta)
        with _PROGRESS.get_lock():
            _PROGRESS.value += 1

    def close(self):
        with _noting_full_disk():
            super().close()


@contextlib.contextmanager
def _noting_full_disk():
    try:
        yield
    except OSError as err:
        if disk.is_full(err):
            _DISK_FULL.value = 1
        raise


def _prepare(raw_dir, request: dict) -> None:
    """Reuse finished shards only when they were made from the same rows and settings."""
    stamp = raw_dir / "request.json"
    if raw_dir.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != request):
        storage.remove_tree(raw_dir)  # made from another URL list or other settings
    raw_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(request, indent=2, sort_keys=True))


def download(rows: pa.Table, raw_dir, cfg: DownloadConfig, guard: GuardConfig, source_sha256: str,
             images_root: str | None = None):
    """Download `rows` (row, url, caption) into img2dataset Parquet shards under `raw_dir`; `images:` URLs
    are files under `images_root` (a conversation file's image paths).

    `raw_dir` is a local Path or a prefix in a bucket (storage.path): img2dataset writes each shard through
    fsspec and its `_stats.json` last, so the shards finished before an interruption are not fetched again,
    from wherever they are. The URL list and img2dataset's scratch files stay on the local disk.
    """
    if isinstance(raw_dir, Path):
        raw_dir = raw_dir.absolute()
    with disk.named(raw_dir):
        _prepare(raw_dir, {"source_sha256": source_sha256, "rows": rows.num_rows,
                           "download": to_dict(cfg), "guard": to_dict(guard)})
    done = {int(p.name.split("_")[0]) for p in raw_dir.glob("*_stats.json")}
    with tempfile.TemporaryDirectory(prefix="mmpipe-download-", dir=_scratch_parent(raw_dir)) as scratch:
        _download(rows, raw_dir, Path(scratch), done, cfg, guard, images_root)
    return raw_dir


def _scratch_parent(raw_dir) -> Path | None:
    """Beside a local raw_dir (a full disk is then reported under its name); the system temp dir otherwise."""
    return raw_dir if isinstance(raw_dir, Path) else None


COLUMNS = ["row", "caption", "url"]  # what img2dataset's Reader would put in a shard, in its order


def _download(rows: pa.Table, raw_dir, scratch: Path, done: set[int], cfg: DownloadConfig,
              guard: GuardConfig, images_root: str | None) -> None:
    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
                      encode_quality=cfg.encode_quality, encode_format=cfg.encode_format,
                      min_image_size=cfg.min_image_size, max_aspect_ratio=cfg.max_aspect_ratio)
    downloader = Downloader(
        sample_writer_class=CountingParquetWriter, resizer=resizer, thread_count=cfg.threads, save_caption=True,
        extract_exif=False, output_folder=str(raw_dir), column_list=COLUMNS,
        timeout=cfg.timeout_s, number_sample_per_shard=cfg.samples_per_shard, oom_shard_count=5,
        compute_hash=None, verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries,
        user_agent_token=cfg.user_agent_token, disallowed_header_directives=cfg.disallowed_header_directives,
    )
    with disk.named(scratch):
        shards = _input_shards(rows, scratch, cfg.samples_per_shard, done)
    done_rows = min(rows.num_rows, len(done) * cfg.samples_per_shard)
    with scratch_tmpdir(scratch / "tmp"):
        _run(downloader, shards, cfg.processes, guard, images_root, raw_dir, total=rows.num_rows,
             already=done_rows)


def _input_shards(rows: pa.Table, scratch: Path, per_shard: int, done: set[int]) -> list[tuple[int, str]]:
    """img2dataset's input shards, Arrow IPC files of `per_shard` rows (shard ids number them from the first
    row), except the finished ones in `done`."""
    shards = []
    for shard_id, start in enumerate(range(0, rows.num_rows, per_shard)):
        if shard_id in done:
            continue
        path = scratch / f"{shard_id}.feather"
        shard = rows.slice(start, per_shard).select(COLUMNS)
        with pa.ipc.new_file(str(path), shard.schema) as writer:
            writer.write_table(shard)
        shards.append((shard_id, str(path)))
    return shards


@contextlib.contextmanager
def scratch_tmpdir(path: Path):
    """TMPDIR for the download processes: img2dataset imports wandb, which makes temp dirs at import
    that pool workers never clean up; inside the work dir they go when ingest finishes."""
    path.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = saved


def _run(downloader, shards: list, processes: int, guard: GuardConfig, images_root: str | None, raw_dir,
         total: int, already: int) -> None:
    """Download shards in a spawn pool under a progress bar; failed shards are tried once more, unless the
    disk is full (then an error naming `raw_dir`)."""
    ctx = multiprocessing.get_context("spawn")
    counter, disk_full = ctx.Value("q", 0), ctx.Value("b", 0)
    with progress_bar("downloading", total=total) as advance_to, \
            ctx.Pool(processes, initializer=_init_worker, initargs=(guard, images_root, counter, disk_full),
                     maxtasksperchild=5) as pool:
        for _attempt in range(2):
            result = pool.map_async(downloader, shards, chunksize=1)
            while not result.ready():
                advance_to(already + counter.value)
                result.wait(0.2)
            shards = [row for ok, row in result.get() if not ok]
            if not shards or disk_full.value:
                break
        advance_to(already + counter.value)
    if shards and (disk_full.value or disk.is_full(None, raw_dir)):
        raise disk.full(raw_dir)
