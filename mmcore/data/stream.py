"""Ray Data streaming of a dataset version's work units (units.py) into training workers (nothing materialised)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import ray
import ray.data
import torch
from ray.data._internal.execution.execution_callback import ExecutionCallback

from mmcore.data.units import keep_ids, read_row_groups, timed_passes
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
               .map_batches(keep_ids, batch_format="numpy", batch_size=None, fn_kwargs={"preprocess": preprocess},
                            **task))
    dataset.context.execution_options = ExecutionOptions(
        preserve_order=True, resource_limits=ExecutionResources.for_limits(cpu=cpus) if cpus else None)
    return dataset


def torch_batches(shard, batch_size: int, device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(batch, seconds waited for it), pass after pass without end, from a dataset or a worker's shard."""
    return timed_passes(lambda: shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device),
                        batch_size)


ACTOR_CPUS = 1
"""Logical CPUs each derivation actor holds, and its torch threads."""


class _ShardDeriver:
    """A Ray Data actor that computes derived shards with one model loaded once (data/derived.py)."""

    def __init__(self, derivation, threads: int):
        torch.set_num_threads(threads)
        self.compute = derivation.computer()

    def __call__(self, jobs: dict) -> dict:
        from mmcore.data.derived import write_shard

        done = [write_shard(self.compute, source, target) for source, target in zip(jobs["source"], jobs["target"])]
        return {key: [shard[key] for shard in done] for key in done[0]}


def derivation_cpus() -> int:
    """The CPUs derivation actors take: the cluster's; on a local Ray, no more than the machine's (its logical CPUs
    outnumber a small machine's cores so that data tasks run beside training: fit.local_ray_cpus; models computing
    alone would only contend for the cores, 0.69 of a plain loop's rows/s against 0.82, experiments/infer-pool)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    nodes = [node for node in ray.nodes() if node["Alive"]]
    local = len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == ray.util.get_node_ip_address()
    return min(cpus, os.cpu_count() or 1) if local else cpus


def derive_on_ray(derivation, jobs: list[dict]) -> Iterator[dict]:
    """derived.derive's `map_shards` on Ray Data: each job ({"source", "target"}: a dataset shard and its
    derived shard) one task, on a pool of up to one actor per CPU of the cluster, yielded as written."""
    if not jobs:
        return iter(())
    size = max(1, min(len(jobs), derivation_cpus() // ACTOR_CPUS))
    dataset = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map_batches(
        _ShardDeriver, fn_constructor_kwargs={"derivation": derivation, "threads": ACTOR_CPUS}, batch_size=1,
        batch_format="numpy", num_cpus=ACTOR_CPUS, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size))
    return dataset.iter_rows()
