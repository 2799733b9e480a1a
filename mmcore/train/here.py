"""Training in this process, or in each process torchrun starts: the Trainer on batches read in the process.

No Ray and no registry: what `fit()` runs in Ray Train workers, for one machine, a debugger, a profiler or
an experiment (fit() with cluster.executor=here runs it too, then registers). The run directory holds the
same checkpoints (a re-run resumes), the final model bundle, metrics.json and every logged point in
metrics.jsonl.

    python -m mmcore.train --recipe debug --dataset ~/.mmpipe/datasets/sample [--set optim.max_steps=50]
    torchrun --nproc-per-node 2 -m mmcore.train --recipe debug --dataset ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mmcore import storage
from mmcore.config import RunConfig
from mmcore.data.units import fixed_batches, local_batches, rank_units
from mmcore.models import model_config
from mmcore.train.parents import pin_parents
from mmcore.train.plan import Plan, open_dataset, plan, run_name
from mmcore.train.trainer import JsonLinesLogger, MetricLogger, Trainer, start_engine


def train_here(cfg: RunConfig, run_dir: Path | None = None) -> dict:
    """Train `cfg` here (as one rank of torchrun's, or as the only one) into `run_dir` (default
    <home>/local-runs/<run name>); returns the final metrics. data.batch_size is kept: each of the
    WORLD_SIZE ranks takes batch_size / (WORLD_SIZE * grad_accum) rows a micro-batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, num_workers=world))
    cfg.validate()
    version = open_dataset(cfg)
    tracking_uri = None
    if cfg.model.parent or cfg.data.captioner:  # models:/ URIs: the registry resolves them (pinned versions read)
        from mmcore.tracking import resolve_uri

        tracking_uri = resolve_uri(cfg.tracking)
    parents = pin_parents(cfg, model_config(cfg.model.name), tracking_uri, version)
    cfg, arch = parents.cfg, parents.arch
    run_dir = run_dir or storage.root() / "local-runs" / run_name(cfg, version.id, arch)
    steps = plan(cfg, version, arch, world, parents.dirs, captioner=parents.captioner)
    return run_here(cfg, arch, steps, parents.dirs, run_dir, lambda unsent: JsonLinesLogger(run_dir / "metrics.jsonl"))


def run_here(cfg: RunConfig, arch: dict, steps: Plan, parent_dirs: dict[str, Path], run_dir,
             make_logger: Callable[[list[list]], MetricLogger]) -> dict:
    """This process's rank of the run (torchrun's RANK, or the only one): the Trainer on batches read here,
    then the final bundle and metrics.json. Rank 0 logs through `make_logger(points not delivered before)`.
    fit() calls it for cluster.executor=here, with the MLflow logger. The ranks: parallel.num_workers."""
    world = cfg.parallel.num_workers
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    join_process_group(device)
    engine, dtype, ranks = start_engine(cfg, arch, steps.tokenizer_json, device,
                                        int(os.environ.get("LOCAL_WORLD_SIZE", "1")), parent_dirs)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(engine, cfg, dtype, run_dir, ranks)
    state = trainer.resume()
    if ranks.rank == 0:
        trainer.logger = make_logger(trainer.unsent)
    units = rank_units(steps.train_units, ranks.rank, world, skip_rows=state["rows"])
    batches = local_batches(units, steps.train_preprocess, cfg.micro_batch, device)
    val = fixed_batches(steps.val_units, steps.val_preprocess, cfg.micro_batch, cfg.data.val_batches, ranks.rank,
                        world) if steps.val_units else []
    metrics = trainer.fit(batches, val)
    trainer.save_final(arch, steps.tokenizer_json, steps.preprocess)
    if ranks.rank == 0:  # after the final bundle: a run with metrics.json has finished training (see fit.py)
        storage.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def join_process_group(device: torch.device) -> None:
    """The process group torchrun's variables describe, or a group of one. (DeepSpeed needs a group: without
    one it looks for MPI.) It stays for the process's life: DeepSpeed keeps its own handles on it."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # torchrun's
        dist.init_process_group(backend)
    else:  # one rank: an in-process store, no port to take
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def main(argv: list[str] | None = None) -> None:
    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe

    parser = argparse.ArgumentParser(prog="python -m mmcore.train", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path, help="run directory (default <home>/local-runs/<run name>)")
    args = parser.parse_args(argv)
    metrics = train_here(apply_overrides(recipe(args.recipe, args.dataset), args.overrides), args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
