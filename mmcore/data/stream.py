"""Ray Data streaming of a dataset version's shards into training workers (nothing materialised)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockAccessor

from mmcore.data.dataset import DatasetVersion
from mmcore.models.preprocess import Preprocessor


class WaitWhenIdle(ExecutionCallback):
    """Ray Data 2.60's scheduling loop blocks in ray.wait() until a task finishes, but once backpressure
    holds every operator (the stream is far enough ahead of the trainers) the finished tasks stay
    unread, ray.wait() returns at once and the loop spins: about half a core in the split coordinator
    (py-spy), on a 2-core machine a quarter of the trainers' CPU. A step that did not block is
    followed by a sleep, so that the loop runs at most every PERIOD_S (a step that blocked runs on)."""

    PERIOD_S = 0.1

    def __init__(self):
        self.last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        elapsed = time.perf_counter() - self.last
        if elapsed < self.PERIOD_S:
            time.sleep(self.PERIOD_S - elapsed)
        self.last = time.perf_counter()


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


def rank_units(units: list[dict], rank: int, world: int, skip_rows: int = 0) -> list[dict]:
    """A training rank's share of the units, less the first `skip_rows` rows it already trained on
    (resuming from a checkpoint). Units are dealt in order, each to the rank that holds the fewest rows
    so far (the lowest such rank on a tie), so that whatever the row groups' sizes, the shares differ
    by at most one unit's rows over the whole stream. (Dealing every `world`-th unit gave one rank of
    two the 3-row group of a 256 + 3-row split in every epoch: 12 rows in 4 epochs, under one batch.)
    Every row group is still read by one rank only, whole."""
    held, mine = [0] * world, []
    for unit in units:
        owner = held.index(min(held))
        held[owner] += unit["rows"]
        if owner != rank:
            continue
        if skip_rows >= unit["rows"]:
            skip_rows -= unit["rows"]
            continue
        mine.append({**unit, "skip": skip_rows})
        skip_rows = 0
    return mine


def read_row_groups(units: dict, columns: list[str]) -> pa.Table:
    """A batch of work units -> their rows (in the unit's order, less its `skip` first ones): the
    `columns` the shards have, the unit's `epoch` and each row's split-wide index `sample`."""
    tables = []
    for i, path in enumerate(units["path"]):
        parquet = pq.ParquetFile(path)
        table = parquet.read_row_group(int(units["row_group"][i]),
                                       columns=[c for c in columns if c in parquet.schema_arrow.names])
        epoch, seed, first_row = int(units["epoch"][i]), int(units["seed"][i]), int(units["first_row"][i])
        order = np.random.default_rng([seed, epoch, first_row]).permutation(table.num_rows) if seed >= 0 \
            else np.arange(table.num_rows)
        order = order[int(units["skip"][i]):]
        table = table.take(order)
        table = table.append_column("epoch", pa.array(np.full(len(order), epoch, np.int32)))
        tables.append(table.append_column("sample", pa.array(first_row + order, pa.int64())))
    return pa.concat_tables(tables)


def _keep_ids(batch: dict, preprocess: Preprocessor) -> dict:
    """The model's inputs, and the ids of the rows they came from (the training loop records them)."""
    return {**preprocess(batch), "epoch": batch["epoch"], "sample": batch["sample"]}


def units_dataset(units: list[dict], preprocess: Preprocessor, cpus: float | None = None) -> ray.data.Dataset:
    """Lazily read work units in their order, decoding + tokenizing in `map_batches` tasks.

    One linear pipeline over a list of work units: reading and preprocessing fuse into one task
    per row group, so Ray runs as many data workers as it has CPUs for data. (A union of one
    `read_parquet` per epoch made an operator chain per epoch and started dozens of Ray worker
    processes, each a second or more of CPU on a small machine, before the first batch.) All
    epochs are one stream: restarting the pipeline at every epoch boundary stalls training.
    Rows come out in the units' order (preserve_order), so a stream is a function of its units.
    With `cpus`, the stream's tasks hold at most that many logical CPUs together. A training worker
    executes its own stream in its process; WaitWhenIdle paces the scheduling thread (unpaced, it
    took the GIL from the training step: 2 workers on 2 cores ran at 0.68 of a plain loop's speed;
    run in an actor of its own instead, through a one-way streaming split, it was no faster).
    """
    from ray.data import ExecutionOptions, ExecutionResources

    task = {"num_cpus": min(1.0, cpus)} if cpus else {}  # the same on both maps, or Ray Data does not fuse them
    dataset = (ray.data.from_items(units, override_num_blocks=len(units))
               .map_batches(read_row_groups, batch_size=1, batch_format="numpy",
                            fn_kwargs={"columns": preprocess.columns}, **task)
               .map_batches(_keep_ids, batch_format="numpy", batch_size=None, fn_kwargs={"preprocess": preprocess},
                            **task))
    dataset.context.execution_options = ExecutionOptions(
        preserve_order=True, resource_limits=ExecutionResources.for_limits(cpu=cpus) if cpus else None)
    return dataset


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
        columns = BlockAccessor.for_block(part).to_batch_format("numpy")  # as map_batches gives it
        batches.append({k: torch.tensor(v) for k, v in _keep_ids(columns, preprocess).items()})
    return batches


def torch_batches(shard, batch_size: int, device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(batch, seconds waited for it), pass after pass without end, from a dataset or a worker's shard.

    Passes that yield no batch would spin forever: that is an error instead."""
    while True:
        started, batches = time.perf_counter(), 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device):
            batches += 1
            yield batch, time.perf_counter() - started
            started = time.perf_counter()
        if batches == 0:
            raise ValueError(f"this rank's share of the stream holds fewer rows than one batch of {batch_size}: "
                             "the split is too small for the batch size and the number of workers")
