"""The per-worker training loop: DeepSpeed engine, streamed batches, guarded steps, checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmcore import storage
from mmcore.config import RunConfig, from_dict
from mmcore.data.stream import fixed_batches, rank_units, torch_batches, units_dataset
from mmcore.disk import staged
from mmcore.pause import pause_point
from mmcore.train import checkpoint
from mmcore.train.deepspeed_config import cast_floating, initialize
from mmcore.train.parallel import apply_activation_checkpointing, worker_threads

log = logging.getLogger("mmpipe.train")
"""Worker lines go to Ray Train's worker log (and the driver's log file), never twice: Ray Train turns a
worker's print() into a log record and also echoes it when something wrapped sys.stdout."""


class NonFiniteLoss(RuntimeError):
    """The loss stayed NaN/inf for optim.max_bad_steps micro-batches in a row."""


def all_ranks_true(flag: bool, device) -> bool:
    """The same answer on every rank (a step is skipped everywhere or nowhere)."""
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() == 0.0


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


class StepGuard:
    """Counts non-finite losses: a bad micro-batch is skipped; too many in a row stop the run."""

    def __init__(self, max_bad: int):
        self.max_bad, self.in_a_row, self.total = max_bad, 0, 0

    def check(self, loss_is_finite: bool, step: int) -> bool:
        if loss_is_finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_bad:
            raise NonFiniteLoss(f"the loss was NaN or infinite for {self.in_a_row} micro-batches in a row at step "
                                f"{step}; lower optim.lr or check the data (no checkpoint was written for it)")
        return False


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker; `config` is plain data (see fit.py)."""
    import ray.train
    import ray.train.torch

    from mmcore.tasks import build_task

    cfg = from_dict(RunConfig, config["run"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(worker_threads(cfg.parallel, context.get_local_world_size()))
    run_dir = storage.path(config["run_dir"])  # a local (shared) directory, or a prefix in a bucket
    task, _ = build_task(cfg, config["model_config"], config["tokenizer_json"], tracking_uri=config["tracking_uri"])
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(task)
    engine, _, dtype = initialize(task, cfg, cuda=device.type == "cuda")
    state = _resume(engine, run_dir / "checkpoints", rank, storage.scratch_dir(run_dir), device)
    stream = config["train_stream"]
    units = rank_units(stream["units"], rank, context.get_world_size(), skip_rows=state["rows"])
    train = torch_batches(units_dataset(units, stream["preprocess"], stream["cpus"]), cfg.micro_batch, device)
    val = config["val_stream"]
    val = fixed_batches(val["units"], val["preprocess"], cfg.micro_batch, cfg.data.val_batches, rank,
                        context.get_world_size()) if val else []
    recorder = SampleRecorder(storage.scratch_dir(run_dir) / "samples" / f"rank-{rank}.tsv", state["rows"]) \
        if cfg.data.record_samples else None
    metrics = _train(engine, cfg, train, val, state, dtype, device, run_dir, rank, config, recorder)
    _save_final(engine, cfg, run_dir, rank, config)
    if rank == 0:  # after the final bundle: a run with metrics.json has finished training (see fit.py)
        storage.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    ray.train.report(metrics)


def _resume(engine, root, rank: int, scratch: Path, device) -> dict:
    """Load the newest checkpoint that verifies. On a disk rank 0 picks it and every rank loads it; from a
    bucket every rank downloads each candidate once and checks its own copy, so what a rank loads is
    what it verified, and a candidate counts only when it verified on every rank. When checkpoints
    were written whole but none verifies, every rank raises checkpoint.Unresumable (rank 0's words)."""
    if isinstance(root, Path):
        choice = [_choose_on_disk(root) if rank == 0 else None]  # a path, "" (none) or the Unresumable
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], checkpoint.Unresumable):
            raise choice[0]
        found = path = Path(choice[0]) if choice[0] else None
    else:
        found, path = _choose_in_bucket(root, rank, scratch, device)
    if found is None:
        return {"step": 0, "samples": 0, "rows": 0, "resumed_from": None, "bad_steps": 0}
    engine.load_checkpoint(str(found), tag="state")
    state = {"rows": 0, **checkpoint.read_meta(found)["state"]}  # checkpoints of older versions start the stream over
    if found != path:
        shutil.rmtree(found)
    if rank == 0:
        log.info("resumed from %s (step %d, each rank's stream from row %d)", path, state["step"], state["rows"])
    return {**state, "resumed_from": state["step"]}


def _choose_on_disk(root: Path):
    try:
        return str(checkpoint.latest_verified(root) or "")
    except checkpoint.Unresumable as err:
        return err


def _choose_in_bucket(root, rank: int, scratch: Path, device):
    """(this rank's verified local copy, the checkpoint in the bucket), or (None, None)."""
    names = [[p.name for p in checkpoint.checkpoints(root)] if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)  # one list: the ranks must try the same candidates
    failed = {}
    for name in names[0]:
        remote, local = root / name, scratch / f".resume-rank-{rank}"
        if not all_ranks_true((remote / checkpoint.MANIFEST).exists(), device):
            continue  # never committed: passed over, as on a disk
        why = checkpoint.problem(storage.download_tree(remote, local))
        if all_ranks_true(why is None, device):
            return local, remote
        failed[name] = why or "differs from its manifest on another rank"
        shutil.rmtree(local, ignore_errors=True)
    if failed:
        raise checkpoint.unresumable(root, failed)
    return None, None


def split_ids(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A streamed batch -> (the model's inputs, (B, 2) epoch and split-wide row index of each row)."""
    ids = torch.stack([batch.pop("epoch").long(), batch.pop("sample").long()], dim=1)
    return batch, ids


class SampleRecorder:
    """`data.record_samples`: the rows a rank trained on, one "epoch<TAB>row" line each, in order.

    On resume the file is cut back to the rows the checkpoint had consumed, so after any number of
    restarts it lists exactly the rows behind the model's state (the exactly-once test reads it).
    """

    def __init__(self, path: Path, rows: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = path.read_text().splitlines(keepends=True)[:rows] if path.exists() else []
        if len(kept) < rows:
            raise RuntimeError(f"{path}: {len(kept)} rows recorded, the checkpoint consumed {rows}")
        path.write_text("".join(kept))
        self.handle = open(path, "a")

    def record(self, ids: torch.Tensor) -> None:
        self.handle.writelines(f"{epoch}\t{row}\n" for epoch, row in ids.tolist())
        self.handle.flush()


def _train(engine, cfg: RunConfig, batches, val: list[dict], state: dict, dtype, device, run_dir, rank: int,
           config: dict, recorder: SampleRecorder | None) -> dict:
    from mmcore.tracking import MetricLogger

    kept = state.pop("unsent_metrics", [])  # points MLflow had not taken when the checkpoint was written
    logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"], kept) if rank == 0 else None
    guard = StepGuard(cfg.optim.max_bad_steps)
    guard.total = state["bad_steps"]
    window = {"loss": 0.0, "micro": 0, "wait": 0.0, "start": time.perf_counter(), "extras": {}}
    last: dict = {}
    while engine.global_steps < cfg.optim.max_steps:
        batch, waited = next(batches)
        window["wait"] += waited
        batch, ids = split_ids(batch)
        state["rows"] += len(ids)  # drawn, whether the step then counts or is skipped as non-finite
        if recorder:
            recorder.record(ids)
        out = engine(cast_floating(batch, dtype))
        if not guard.check(all_ranks_true(bool(torch.isfinite(out["loss"]).all()), device), engine.global_steps):
            continue
        engine.backward(out["loss"])
        pause_point("train-step", engine.global_steps + 1)
        before = engine.global_steps
        engine.step()
        window["loss"] += out["loss"].item()
        window["micro"] += 1
        for key, value in out.items():  # the task's other scalars (e.g. logit_scale), summed on the device
            if key != "loss" and value.numel() == 1:
                total, count = window["extras"].get(key, (0.0, 0))
                window["extras"][key] = (total + value.detach().float(), count + 1)
        state["samples"] += cfg.micro_batch * cfg.parallel.num_workers
        if engine.global_steps == before:
            continue
        step = engine.global_steps
        if step % 10 == 0 or step == cfg.optim.max_steps or step % cfg.checkpoint.every_steps == 0:
            last = _log_window(engine, cfg, window, step, guard, device, rank, logger)
            if rank == 0:
                write_progress(run_dir, step, cfg.optim.max_steps, last)
        if step % cfg.checkpoint.every_steps == 0 and step < cfg.optim.max_steps:
            last.update(_validate(engine, val, dtype, device))
            if logger:
                logger.log({k: v for k, v in last.items() if k.startswith("val_")}, step)
            unsent = logger.unsent() if logger else []
            _checkpoint(engine, cfg, run_dir, rank, {**state, "step": step, "bad_steps": guard.total,
                                                     "unsent_metrics": unsent}, last)
            window["start"] = time.perf_counter()  # throughput counts training, not the pause to save
    last.update(_validate(engine, val, dtype, device))
    if logger:
        logger.log({k: v for k, v in last.items() if k.startswith("val_")}, engine.global_steps)
        last["tracking_lost"] = logger.close(cfg.tracking.wait_s)
        last["tracking_failures"] = logger.failures
    last.update(resumed_from=state["resumed_from"] or 0, bad_steps=guard.total, samples=state["samples"])
    return last


def write_progress(run_dir, step: int, max_steps: int, metrics: dict) -> None:
    """`progress.json` for the driver's progress bar (never read half-written)."""
    progress = {"step": step, "max_steps": max_steps, "loss": metrics["loss"],
                "samples_per_second": metrics["samples_per_second"]}
    storage.write_text(run_dir / "progress.json", json.dumps(progress))


def _log_window(engine, cfg, window, step, guard, device, rank, logger) -> dict:
    elapsed = time.perf_counter() - window["start"]
    local = {"loss": window["loss"] / max(window["micro"], 1), "data_wait_fraction": window["wait"] / elapsed}
    metrics = mean_over_ranks(local, device)
    rows = window["micro"] * cfg.micro_batch * cfg.parallel.num_workers
    metrics.update(step=step, lr=engine.get_lr()[0], samples_per_second=rows / elapsed, bad_steps=guard.total,
                   **{k: float(total) / count for k, (total, count) in window["extras"].items()})  # this rank's window means
    if rank == 0:
        log.info("step %d/%d loss %.4f lr %.2e samples/s %.0f data wait %.0f%%", step, cfg.optim.max_steps,
                 metrics["loss"], metrics["lr"], metrics["samples_per_second"], 100 * metrics["data_wait_fraction"])
        logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
    window.update(loss=0.0, micro=0, wait=0.0, start=time.perf_counter(), extras={})
    return metrics


def _validate(engine, val: list[dict], dtype, device) -> dict:
    """Mean loss over this worker's validation batches, averaged over the workers (each holds as many:
    see fixed_batches; none when the val split is smaller than a batch per worker)."""
    if not val:
        return {}
    losses = []
    engine.eval()
    with torch.no_grad():
        for batch in val:
            batch = {k: v.to(device) for k, v in batch.items()}
            losses.append(engine(cast_floating(split_ids(batch)[0], dtype))["loss"].item())
    engine.train()
    return mean_over_ranks({"val_loss": sum(losses) / len(losses), "val_batches": float(len(losses))}, device)


def held_values(param: torch.Tensor) -> torch.Tensor:
    """The values of `param` this rank holds: all of them, or under ZeRO-3 its partition less the padding
    that evens the partitions out. DeepSpeed leaves that padding uninitialised (torch.empty), so it can
    hold NaN bit patterns: read whole, it failed the finiteness check of a healthy run at random."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * part.ds_numel
    return part.narrow(0, 0, max(0, min(param.ds_numel - start, part.ds_numel)))


def _params_finite(engine, device) -> bool:
    local = all(bool(torch.isfinite(held_values(p)).all()) for p in engine.module.parameters())
    return all_ranks_true(local, device)


def _checkpoint(engine, cfg: RunConfig, run_dir, rank: int, state: dict, metrics: dict) -> None:
    """Every rank saves its part; rank 0 seals (on a disk) or commits (in a bucket) it and prunes old ones.

    Nothing is reported to Ray Train: a checkpoint it knew of would enter its run snapshot, which it
    checks against storage when a run directory is used again and refuses to start when a listed
    checkpoint is gone (pruned here after the snapshot was last written). Resume reads these
    checkpoints themselves (`_resume`), after a worker-group restart and after a new command alike.
    """
    if not _params_finite(engine, next(engine.module.parameters()).device):
        raise NonFiniteLoss(f"parameters are not finite at step {state['step']}; refusing to write a checkpoint")
    root, meta = run_dir / "checkpoints", {"state": state, "metrics": metrics}
    final = _save_on_disk(engine, root, rank, state["step"], meta) if isinstance(root, Path) \
        else _save_in_bucket(engine, root, rank, state["step"], meta, storage.scratch_dir(run_dir))
    if rank == 0:
        checkpoint.prune(root, cfg.checkpoint.keep)
        log.info("checkpoint %s", final)
    dist.barrier()  # no rank trains on before the checkpoint is whole


def _save_on_disk(engine, root: Path, rank: int, step: int, meta: dict) -> Path | None:
    """Every rank writes into the one staging dir; rank 0 writes the manifest and renames it into place.
    A staging dir of the same step left by a killed run is removed first (it may hold its manifest)."""
    staging = checkpoint.staging_dir(root, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    with staged(staging):
        engine.save_checkpoint(str(staging), tag="state", save_latest=False)
    dist.barrier()
    if rank == 0:
        with staged(staging):
            return checkpoint.seal(root, step, meta)
    return None


def _save_in_bucket(engine, root, rank: int, step: int, meta: dict, scratch: Path):
    """Every rank saves into a dir of its own on its node's disk and uploads its files; rank 0 writes the
    manifest, listing every rank's files, last. A step written again first loses its old manifest."""
    final = checkpoint.step_dir(root, step)
    if rank == 0:
        storage.remove_tree(final)
    dist.barrier()
    local = scratch / f".{final.name}.rank-{rank}.tmp"
    shutil.rmtree(local, ignore_errors=True)  # left by a killed run: only this save's files are uploaded
    with staged(local):
        engine.save_checkpoint(str(local), tag="state", save_latest=False)
        files = storage.upload_tree(local, final)
    shutil.rmtree(local)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, files)
    if rank == 0:
        return checkpoint.commit(root, step, {name: digest for part in every for name, digest in part.items()}, meta)
    return None


def _save_final(engine, cfg: RunConfig, run_dir, rank: int, config: dict) -> None:
    """Consolidated fp32 weights (ZeRO-3 gathered) as a model bundle, written by rank 0."""
    import deepspeed

    from mmcore.models.preprocess import PreprocessConfig
    from mmcore.tracking import ModelBundle

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.parallel.zero_stage == 3 \
        else contextlib.nullcontext()
    with gather:
        if rank == 0:
            staging = storage.scratch_dir(run_dir) / ".final.tmp"
            with staged(staging):
                ModelBundle.write(staging, engine.module.model, config["model_config"], config["tokenizer_json"],
                                  PreprocessConfig(**config["preprocess"]))
            storage.publish(staging, run_dir / "final")
    if dist.is_initialized():
        dist.barrier()
