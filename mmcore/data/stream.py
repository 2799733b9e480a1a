"""Ray Data streaming of a dataset version's shards into training workers (nothing materialised)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import ray.data
import torch

from mmcore.data.dataset import DatasetVersion
from mmcore.models.preprocess import Preprocessor


def split_dataset(version: DatasetVersion, split: str, preprocess: Preprocessor, epochs: int = 1,
                  augment: bool = False) -> ray.data.Dataset:
    """Lazily read one split's shards, decode + tokenize in `map_batches` tasks.

    Several epochs are one stream (a union of the split with itself; each copy's block order
    shuffled): restarting the pipeline at every epoch boundary stalls training for seconds while
    it spins up again. (Repeating the file list does not work: Ray Data drops duplicate paths.)
    """
    paths = [str(p) for p in version.shard_paths(split)]
    if not paths:
        raise ValueError(f"{version.path}: split {split!r} has no shards")
    dataset = ray.data.read_parquet(paths).select_columns(["image", "caption"])
    if split == "train":
        dataset = dataset.randomize_block_order()
    if epochs > 1:
        dataset = dataset.union(*[dataset] * (epochs - 1))
    return dataset.map_batches(preprocess.for_split(split, augment), batch_format="numpy", batch_size=256)


def torch_batches(shard, batch_size: int, device: torch.device, shuffle: bool,
                  epochs: int | None = None) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(batch, seconds waited for it), epoch after epoch, from a worker's dataset shard."""
    epoch = 0
    while epochs is None or epoch < epochs:
        iterator = shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=4 * batch_size if shuffle else None,
            local_shuffle_seed=epoch if shuffle else None,
            dtypes={"image": torch.float32, "tokens": torch.int64},
        )
        started = time.perf_counter()
        for batch in iterator:
            yield batch, time.perf_counter() - started
            started = time.perf_counter()
        epoch += 1
