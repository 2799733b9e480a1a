"""The Ray Train worker: a thin adapter around the Trainer (parents fetched from the registry, Ray Data
batches in, the MLflow logger)."""

from __future__ import annotations

import json

from mmcore import storage
from mmcore.config import RunConfig, from_dict
from mmcore.data.stream import torch_batches, units_dataset
from mmcore.data.units import fixed_batches, rank_units
from mmcore.models.preprocess import PreprocessConfig
from mmcore.train.parents import fetch_parents
from mmcore.train.trainer import Trainer, start_engine


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker; `config` is plain data (see fit.py)."""
    import ray.train
    import ray.train.torch

    from mmcore.tracking import MetricLogger

    cfg = from_dict(RunConfig, config["run"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    parents = fetch_parents(cfg, config["tracking_uri"])  # to this node's disk: the Task reads local bundles
    engine, dtype, ranks = start_engine(cfg, config["model_config"], config["tokenizer_json"], device,
                                        context.get_local_world_size(), parents)
    run_dir = storage.path(config["run_dir"])  # a local (shared) directory, or a prefix in a bucket
    trainer = Trainer(engine, cfg, dtype, run_dir, ranks)
    state = trainer.resume()
    if rank == 0:
        trainer.logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"], trainer.unsent)
    stream = config["train_stream"]
    units = rank_units(stream["units"], rank, world, skip_rows=state["rows"])
    train = torch_batches(units_dataset(units, stream["preprocess"], stream["cpus"]), cfg.micro_batch, device)
    val = config["val_stream"]
    val = fixed_batches(val["units"], val["preprocess"], cfg.micro_batch, cfg.data.val_batches, rank, world) \
        if val else []
    metrics = trainer.fit(train, val)
    trainer.save_final(config["model_config"], config["tokenizer_json"], PreprocessConfig(**config["preprocess"]))
    if rank == 0:  # after the final bundle: a run with metrics.json has finished training (see fit.py)
        storage.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    ray.train.report(metrics)
