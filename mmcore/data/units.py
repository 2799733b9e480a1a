"""A dataset version's rows as work units and batches, read in this process: no Ray.

A work unit is one (epoch, shard, row group); the order of the units, and of the rows inside each,
depends on (seed, epoch) alone, so every row read has a stable id and a stream is a function of its
units. Ray Data streams the same units into Ray Train workers (stream.py); `local_batches` gives the
same batches in one process (the one-process trainer, tests, experiments).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mmcore.data.dataset import DatasetVersion
from mmcore.models.preprocess import Preprocessor


def work_units(version: DatasetVersion, split: str, epochs: int = 1, seed: int = 0) -> list[dict]:
    """Every (epoch, shard, row group) of a split, in an order that depends on (seed, epoch) alone.

    Row groups are the unit of reading (256 rows each in our shards). On the train split the units
    are permuted per epoch and so are the rows inside each unit; the other splits keep the manifest's
    order. A unit carries the split-wide index of its first row, so every row read has a stable id.
    """
    groups, first_row = [], 0
    for path in version.shard_paths(split):
        metadata = pq.ParquetFile(str(path)).metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            groups.append({"path": str(path), "row_group": group, "first_row": first_row, "rows": rows})
            first_row += rows
    if not groups:
        raise ValueError(f"{version.path}: split {split!r} has no shards")
    shuffle = split == "train"
    units = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(groups)) if shuffle else range(len(groups))
        units += [{**groups[i], "epoch": epoch, "seed": seed if shuffle else -1, "skip": 0} for i in order]
    return units


def train_units(sources: list[tuple[DatasetVersion, float]], rows: int, seed: int = 0, grain: int = 0) -> list[dict]:
    """The train split's units of one dataset version, or of several mixed by weight (data.mix): each version's
    units in their own order (work_units, as many epochs as its share of `rows` needs and one more), cut into
    slices of `grain` rows (mixed only: so that a batch holds rows of every version, not a row group of one),
    dealt in turn to the version furthest below its weight's share of the rows dealt so far: every stretch of
    the stream holds each version's share to within a slice. A unit names its version (`source`); a row's id
    counts on from the train rows of the versions before its own, so that ids stay distinct."""
    streams, offset, step = [], 0, grain if len(sources) > 1 else 0
    for k, (version, weight) in enumerate(sources):
        train = version.manifest["splits"]["train"]
        units = work_units(version, "train", math.ceil(rows * weight / max(train, 1)) + 1, seed)
        streams.append([{**unit, "first_row": unit["first_row"] + offset, "source": k, "skip": start,
                         "rows": min(step, unit["rows"] - start) if step else unit["rows"]}
                        for unit in units for start in range(0, unit["rows"], step or unit["rows"])])
        offset += train
    dealt, taken, out = [0] * len(streams), [0] * len(streams), []
    while all(taken[k] < len(stream) for k, stream in enumerate(streams)):
        k = min(range(len(streams)), key=lambda k: dealt[k] / sources[k][1])
        out.append(streams[k][taken[k]])
        dealt[k], taken[k] = dealt[k] + out[-1]["rows"], taken[k] + 1
    return out


def rank_units(units: list[dict], rank: int, world: int, skip_rows: int = 0) -> list[dict]:
    """A training rank's share of the units, less the first `skip_rows` rows it already trained on
    (resuming from a checkpoint). Units are dealt in order, each to the rank that holds the fewest rows
    of its version so far (the lowest such rank on a tie), so that whatever the row groups' sizes, the
    shares differ by at most one unit's rows of each version over the whole stream, and every rank's
    stream mixes the versions as the whole does. (Dealing every `world`-th unit gave one rank of two the
    3-row group of a 256 + 3-row split in every epoch: 12 rows in 4 epochs, under one batch.) Every unit
    is read by one rank only, whole."""
    held, mine = {}, []
    for unit in units:
        counts = held.setdefault(unit.get("source", 0), [0] * world)
        owner = counts.index(min(counts))
        counts[owner] += unit["rows"]
        if owner != rank:
            continue
        if skip_rows >= unit["rows"]:
            skip_rows -= unit["rows"]
            continue
        mine.append({**unit, "skip": unit["skip"] + skip_rows, "rows": unit["rows"] - skip_rows})
        skip_rows = 0
    return mine


def _read_row_group(path: str, group: int, columns: tuple[str, ...]) -> pa.Table:
    """A row group's `columns` (those the shard has)."""
    parquet = pq.ParquetFile(path)
    return parquet.read_row_group(group, columns=[c for c in columns if c in parquet.schema_arrow.names])


_row_group = functools.lru_cache(maxsize=16)(_read_row_group)
"""Cached: the slices of one row group (a mix's) read it once."""
_derived_row_group = functools.lru_cache(maxsize=4)(_read_row_group)
"""Fewer of a derived shard's: a tower's features outweigh the images (ViT-L/14: 1.2 MB a row in float16, 300 MB
a row group of 256)."""


def read_row_groups(units: dict, columns: list[str]) -> pa.Table:
    """A batch of work units -> their rows (in the unit's order, its `rows` rows after its `skip` first
    ones): the `columns` the shards have, the unit's `epoch` and each row's split-wide index `sample`."""
    tables = []
    for i, path in enumerate(units["path"]):
        table = _row_group(str(path), int(units["row_group"][i]), tuple(columns))
        if "derived" in units:  # a derived version's columns, row for row (data/derived.py)
            table = _with_derived(table, str(path), str(units["derived"][i]), int(units["row_group"][i]), columns)
        epoch, seed, first_row = int(units["epoch"][i]), int(units["seed"][i]), int(units["first_row"][i])
        if "captions" in units and units["captions"][i]:  # data.captioner's, for a share of the rows
            draw = np.random.default_rng([max(seed, 0), epoch, first_row, 1]).random(table.num_rows)
            table = _recaptioned(table, str(path), str(units["captions"][i]), int(units["row_group"][i]),
                                 draw < float(units["generated_share"][i]))
        order = np.random.default_rng([seed, epoch, first_row]).permutation(table.num_rows) if seed >= 0 \
            else np.arange(table.num_rows)
        skip = int(units["skip"][i])
        order = order[skip: skip + int(units["rows"][i])]
        table = table.take(order)
        table = table.append_column("epoch", pa.array(np.full(len(order), epoch, np.int32)))
        tables.append(table.append_column("sample", pa.array(first_row + order, pa.int64())))
    return pa.concat_tables(tables)


def _with_derived(table: pa.Table, path: str, derived: str, group: int, columns: list[str]) -> pa.Table:
    """A row group's columns and those of its derived shard that `columns` asks for."""
    extra = _derived_columns(path, derived, group, columns)
    for name in extra.column_names:
        if name != "key" and name not in table.column_names:
            table = table.append_column(name, extra.column(name))
    return table


def _recaptioned(table: pa.Table, path: str, captions: str, group: int, generated: np.ndarray) -> pa.Table:
    """A row group with the `generated` rows' captions replaced by the captions derived version's."""
    written = _derived_columns(path, captions, group, ["generated_caption"]).column("generated_caption")
    caption = pc.if_else(pa.array(generated), written, table.column("caption"))
    return table.set_column(table.column_names.index("caption"), "caption", caption)


def _derived_columns(path: str, derived: str, group: int, columns: list[str]) -> pa.Table:
    """`columns` and `key` of a derived shard's row group, checked row for row against the dataset shard's."""
    try:
        extra = _derived_row_group(derived, group, (*columns, "key"))
    except (OSError, IndexError, pa.ArrowException) as err:
        raise ValueError(f"{derived}: row group {group} cannot be read ({err}); delete its derived version to "
                         "compute it again") from None
    if _row_group(path, group, ("key",)).column("key") != extra.column("key"):
        raise ValueError(f"{derived}: row group {group} does not hold the rows of {path}'s; delete its derived "
                         "version to compute it again")
    return extra


def keep_ids(batch: dict, preprocess: Preprocessor) -> dict:
    """The model's inputs, and the ids of the rows they came from (the training loop records them)."""
    return {**preprocess(batch), "epoch": batch["epoch"], "sample": batch["sample"]}


def numpy_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow table as the numpy batch Ray Data's map_batches gives (strings and bytes as object arrays)."""
    return {name: column.to_numpy(zero_copy_only=False) for name, column in zip(table.column_names, table.columns)}


def fixed_batches(units: list[dict], preprocess: Preprocessor, batch_size: int, count: int, rank: int = 0,
                  world: int = 1) -> list[dict]:
    """This rank's validation batches: the first whole batches of `units`' rows dealt to the ranks in
    turn (batches rank, rank + world, ...), at most `count` each and the same number on every rank
    (a forward pass may be a collective: CLIP's loss gathers every rank's features), read and
    preprocessed in this process as (B, ...) tensors on the CPU; the same rows at every call. So few
    rows are read that Ray Data's tasks, and the Ray processes they start, would cost more than they
    save. Empty on every rank when the split holds fewer than one batch per rank."""
    wanted, tables, rows = batch_size * count * world, [], 0
    for unit in units:
        if rows >= wanted:
            break
        tables.append(read_row_groups({k: [v] for k, v in unit.items()}, preprocess.columns))
        rows += tables[-1].num_rows
    each = min(count, rows // (batch_size * world))
    table, batches = pa.concat_tables(tables) if tables else None, []
    for index in range(rank, each * world, world):
        part = table.slice(index * batch_size, batch_size)
        columns = numpy_columns(part)  # as map_batches gives it
        batches.append({k: torch.tensor(v) for k, v in keep_ids(columns, preprocess).items()})
    return batches


def timed_passes(one_pass: Callable[[], Iterable[dict[str, torch.Tensor]]],
                 batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(batch, seconds waited for it), pass after pass of `one_pass()` without end. A pass that yields no
    batch would spin forever: that is an error instead."""
    while True:
        started, batches = time.perf_counter(), 0
        for batch in one_pass():
            batches += 1
            yield batch, time.perf_counter() - started
            started = time.perf_counter()
        if batches == 0:
            raise ValueError(f"this rank's share of the stream holds fewer rows than one batch of {batch_size}: "
                             "the split is too small for the batch size and the number of workers")


def local_batches(units: list[dict], preprocess: Preprocessor, batch_size: int,
                  device: torch.device | str = "cpu") -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(batch, seconds spent making it), pass after pass: the batches Ray Data's stream of the same units
    gives (stream.units_dataset + torch_batches: each unit read and preprocessed whole, rows batched across
    units, a last partial batch dropped), read and preprocessed in this process."""
    def one_pass() -> Iterator[dict[str, torch.Tensor]]:
        pending = None
        for unit in units:
            rows = keep_ids(numpy_columns(read_row_groups({k: [v] for k, v in unit.items()}, preprocess.columns)),
                            preprocess)
            pending = rows if pending is None else {k: np.concatenate([pending[k], rows[k]]) for k in rows}
            while len(pending["sample"]) >= batch_size:
                yield {k: torch.as_tensor(v[:batch_size]).to(device) for k, v in pending.items()}
                pending = {k: v[batch_size:] for k, v in pending.items()}

    return timed_passes(one_pass, batch_size)
