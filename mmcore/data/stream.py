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

from mmcore.data.dataset import DatasetVersion
from mmcore.models.preprocess import Preprocessor


class WaitWhenIdle(ExecutionCallback):
    """Ray Data 2.60's scheduling loop blocks in ray.wait() until a task finishes, but once backpressure
    holds every operator (the stream is far enough ahead of the trainers) the finished tasks stay
    unread, ray.wait() returns at once and the loop spins: about half a core in the split coordinator
    (py-spy), on a 2-core machine a quarter of the trainers' CPU. A step that did not block is
    followed by a short sleep."""

    SPIN_S, SLEEP_S = 0.002, 0.02

    def __init__(self):
        self.last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        if time.perf_counter() - self.last < self.SPIN_S:
            time.sleep(self.SLEEP_S)
        self.last = time.perf_counter()


def work_units(version: DatasetVersion, split: str, epochs: int = 1, seed: int = 0) -> list[dict]:
    """Every (epoch, shard, row group) of a split, in an order that depends on (seed, epoch) alone.

    Row groups are the unit of reading (256 rows each in our shards); the train split is
    permuted per epoch, the others keep the manifest's order.
    """
    groups = [(str(path), group) for path in version.shard_paths(split)
              for group in range(pq.ParquetFile(path).num_row_groups)]
    if not groups:
        raise ValueError(f"{version.path}: split {split!r} has no shards")
    units = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(groups)) if split == "train" \
            else range(len(groups))
        units += [{"epoch": epoch, "path": groups[i][0], "row_group": groups[i][1]} for i in order]
    return units


def read_row_groups(units: dict, columns: list[str]) -> pa.Table:
    """A batch of work units -> their rows: the `columns` the shards have, and the unit's `epoch`."""
    tables = []
    for path, group, epoch in zip(units["path"], units["row_group"], units["epoch"]):
        parquet = pq.ParquetFile(path)
        table = parquet.read_row_group(int(group), columns=[c for c in columns if c in parquet.schema_arrow.names])
        tables.append(table.append_column("epoch", pa.array([int(epoch)] * table.num_rows, pa.int32())))
    return pa.concat_tables(tables)


def split_dataset(version: DatasetVersion, split: str, preprocess: Preprocessor, epochs: int = 1,
                  augment: bool = False, seed: int = 0) -> ray.data.Dataset:
    """Lazily read one split, epoch after epoch, decoding + tokenizing in `map_batches` tasks.

    One linear pipeline over a list of work units: reading and preprocessing fuse into one task
    per row group, so Ray runs as many data workers as it has CPUs for data. (A union of one
    `read_parquet` per epoch made an operator chain per epoch and started dozens of Ray worker
    processes, each a second or more of CPU on a small machine, before the first batch.) All
    epochs are one stream: restarting the pipeline at every epoch boundary stalls training.
    """
    units = work_units(version, split, epochs, seed)
    return (ray.data.from_items(units, override_num_blocks=len(units))
            .map_batches(read_row_groups, batch_size=1, batch_format="numpy", fn_kwargs={"columns": preprocess.columns})
            .map_batches(preprocess.for_split(split, augment), batch_format="numpy", batch_size=None))


def torch_batches(shard, batch_size: int, device: torch.device, shuffle: bool,
                  epochs: int | None = None) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(batch, seconds waited for it), pass after pass, from a worker's dataset shard."""
    epoch = 0
    while epochs is None or epoch < epochs:
        iterator = shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=4 * batch_size if shuffle else None,
            local_shuffle_seed=epoch if shuffle else None,
        )
        started = time.perf_counter()
        for batch in iterator:
            yield batch, time.perf_counter() - started
            started = time.perf_counter()
        epoch += 1
