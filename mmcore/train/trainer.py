"""The training loop, with no Ray and no MLflow in it: a DeepSpeed engine around a Task, guarded steps,
validation, checkpoints (CheckpointStore) and metrics through a logger.

It runs wherever its batches come from: a Ray Train worker (loop.py: Ray Data batches, the MLflow
logger), one process or torchrun (`python -m mmcore.train`: batches read in the process). Every rank
makes one Trainer; only rank 0 is given a logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from mmcore import storage
from mmcore.config import RunConfig
from mmcore.disk import staged
from mmcore.pause import pause_point
from mmcore.train.checkpoint import CheckpointStore
from mmcore.train.deepspeed_config import cast_floating
from mmcore.train.ranks import Ranks

log = logging.getLogger("mmpipe.train")
"""Worker lines go to Ray Train's worker log (and the driver's log file), never twice: Ray Train turns a
worker's print() into a log record and also echoes it when something wrapped sys.stdout."""

Batches = Iterator[tuple[dict[str, torch.Tensor], float]]
"""(batch, seconds waited for it), without end: the model's inputs plus each row's `epoch` and `sample`."""


class NonFiniteLoss(RuntimeError):
    """The loss stayed NaN/inf for optim.max_bad_steps micro-batches in a row."""


class MetricLogger(Protocol):
    """Where rank 0's metrics go (tracking.MetricLogger: MLflow; JsonLinesLogger: a file)."""

    failures: int

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def unsent(self) -> list[list]:
        """Points not delivered yet, kept in the next checkpoint and handed back on resume."""

    def close(self, wait_s: float) -> int:
        """Deliver what is left; returns how many points were lost."""


class JsonLinesLogger:
    """Metrics as JSON lines in a file (the one-process trainer's): nothing can be left undelivered."""

    failures = 0

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.handle.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.handle.flush()

    def unsent(self) -> list[list]:
        return []

    def close(self, wait_s: float) -> int:
        self.handle.close()
        return 0


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


def split_ids(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A streamed batch -> (the model's inputs, (B, 2) epoch and split-wide row index of each row)."""
    ids = torch.stack([batch.pop("epoch").long(), batch.pop("sample").long()], dim=1)
    return batch, ids


def held_values(param: torch.Tensor) -> torch.Tensor:
    """The values of `param` this rank holds: all of them, or under ZeRO-3 its partition less the padding
    that evens the partitions out. DeepSpeed leaves that padding uninitialised (torch.empty), so it can
    hold NaN bit patterns: read whole, it failed the finiteness check of a healthy run at random."""
    part = getattr(param, "ds_tensor", None)
    if part is None:
        return param
    start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * part.ds_numel
    return part.narrow(0, 0, max(0, min(param.ds_numel - start, part.ds_numel)))


def write_progress(run_dir, step: int, max_steps: int, metrics: dict) -> None:
    """`progress.json` for the driver's progress bar (never read half-written)."""
    progress = {"step": step, "max_steps": max_steps, "loss": metrics["loss"],
                "samples_per_second": metrics["samples_per_second"]}
    storage.write_text(run_dir / "progress.json", json.dumps(progress))


def start_engine(cfg: RunConfig, model_config: dict, tokenizer_json: str, device: torch.device, local_world: int,
                 parents: dict[str, Path] | None = None) -> tuple[object, torch.dtype, Ranks]:
    """This rank's DeepSpeed engine around the stage's Task (its parents from local bundle directories,
    tasks.Parents), under an initialized process group: seeded per rank, its share of the node's cores,
    activation checkpointing if asked. -> (engine, the dtype of its inputs, the ranks)."""
    from mmcore.tasks import build_task
    from mmcore.train.deepspeed_config import initialize
    from mmcore.train.parallel import apply_activation_checkpointing, worker_threads

    ranks = Ranks(device)
    torch.manual_seed(cfg.seed + ranks.rank)
    torch.set_num_threads(worker_threads(cfg.parallel, local_world))
    task, _ = build_task(cfg, model_config, tokenizer_json, parents)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(task)
    engine, _, dtype = initialize(task, cfg, cuda=device.type == "cuda")
    return engine, dtype, ranks


class Trainer:
    """One rank's training of a DeepSpeed `engine` (a Task inside) under `cfg`, into `run_dir`."""

    def __init__(self, engine, cfg: RunConfig, dtype: torch.dtype, run_dir, ranks: Ranks):
        self.engine, self.cfg, self.dtype, self.run_dir, self.ranks = engine, cfg, dtype, run_dir, ranks
        self.logger: MetricLogger | None = None
        """Rank 0's, set after `resume` (none on the other ranks)."""
        self.store = CheckpointStore.of(run_dir)
        self.state = {"step": 0, "samples": 0, "rows": 0, "resumed_from": None, "bad_steps": 0}
        self.recorder: SampleRecorder | None = None
        self.unsent: list[list] = []
        """After `resume`: the points rank 0's logger had not delivered when the checkpoint was written (a
        logger made after `resume` takes them back: tracking.MetricLogger's `kept`)."""

    def resume(self) -> dict:
        """Load the newest checkpoint that verifies (CheckpointStore.restored); the state to go on from:
        `rows` is how many rows of its stream this rank has drawn. Call before `fit`."""
        with self.store.restored(self.ranks) as found:
            if found is not None:
                self.engine.load_checkpoint(str(found.local), tag="state")
                self.state = {"rows": 0, **found.meta["state"]}  # older checkpoints start the stream over
                self.unsent = self.state.pop("unsent_metrics", [])
                self.state["resumed_from"] = self.state["step"]
                if self.ranks.rank == 0:
                    log.info("resumed from %s (step %d, each rank's stream from row %d)", found.where,
                             self.state["step"], self.state["rows"])
        if self.cfg.data.record_samples:
            scratch = storage.scratch_dir(self.run_dir)
            self.recorder = SampleRecorder(scratch / "samples" / f"rank-{self.ranks.rank}.tsv", self.state["rows"])
        return self.state

    def fit(self, batches: Batches, val: list[dict]) -> dict:
        """Train until optim.max_steps, with validation and a checkpoint every checkpoint.every_steps;
        returns the last window's metrics (rank means) with the final validation and the run's counts."""
        engine, cfg, state = self.engine, self.cfg, self.state
        guard = StepGuard(cfg.optim.max_bad_steps)
        guard.total = state["bad_steps"]
        window = {"loss": 0.0, "micro": 0, "wait": 0.0, "start": time.perf_counter(), "extras": {}}
        last: dict = {}
        while engine.global_steps < cfg.optim.max_steps:
            batch, waited = next(batches)
            window["wait"] += waited
            batch, ids = split_ids(batch)
            state["rows"] += len(ids)  # drawn, whether the step then counts or is skipped as non-finite
            if self.recorder:
                self.recorder.record(ids)
            out = engine(cast_floating(batch, self.dtype))
            if not guard.check(self.ranks.all_true(bool(torch.isfinite(out["loss"]).all())), engine.global_steps):
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
            state["samples"] += cfg.micro_batch * self.ranks.world
            if engine.global_steps == before:
                continue
            step = engine.global_steps
            if step % 10 == 0 or step == cfg.optim.max_steps or step % cfg.checkpoint.every_steps == 0:
                last = self._log_window(window, step, guard)
            if step % cfg.checkpoint.every_steps == 0 and step < cfg.optim.max_steps:
                last.update(self._validate(val))
                self._log_val(last, step)
                self._checkpoint({**state, "step": step, "bad_steps": guard.total,
                                  "unsent_metrics": self.logger.unsent() if self.logger else []}, last)
                window["start"] = time.perf_counter()  # throughput counts training, not the pause to save
        last.update(self._validate(val))
        self._log_val(last, engine.global_steps)
        if self.logger:
            last["tracking_lost"] = self.logger.close(cfg.tracking.wait_s)
            last["tracking_failures"] = self.logger.failures
        last.update(resumed_from=state["resumed_from"] or 0, bad_steps=guard.total, samples=state["samples"])
        return last

    def _log_window(self, window: dict, step: int, guard: StepGuard) -> dict:
        cfg, engine = self.cfg, self.engine
        elapsed = time.perf_counter() - window["start"]
        local = {"loss": window["loss"] / max(window["micro"], 1), "data_wait_fraction": window["wait"] / elapsed}
        metrics = self.ranks.mean(local)
        rows = window["micro"] * cfg.micro_batch * self.ranks.world
        metrics.update(step=step, lr=engine.get_lr()[0], samples_per_second=rows / elapsed, bad_steps=guard.total,
                       **{k: float(total) / count for k, (total, count) in window["extras"].items()})  # this rank's
        if self.ranks.rank == 0:
            log.info("step %d/%d loss %.4f lr %.2e samples/s %.0f data wait %.0f%%", step, cfg.optim.max_steps,
                     metrics["loss"], metrics["lr"], metrics["samples_per_second"],
                     100 * metrics["data_wait_fraction"])
            if self.logger:
                self.logger.log({k: v for k, v in metrics.items() if k != "step"}, step)
            write_progress(self.run_dir, step, cfg.optim.max_steps, metrics)
        window.update(loss=0.0, micro=0, wait=0.0, start=time.perf_counter(), extras={})
        return metrics

    def _log_val(self, metrics: dict, step: int) -> None:
        if self.logger:
            self.logger.log({k: v for k, v in metrics.items() if k.startswith("val_")}, step)

    def _validate(self, val: list[dict]) -> dict:
        """Mean loss over this rank's validation batches, averaged over the ranks (each holds as many:
        see units.fixed_batches; none when the val split is smaller than a batch per rank)."""
        if not val:
            return {}
        losses = []
        self.engine.eval()
        with torch.no_grad():
            for batch in val:
                batch = {k: v.to(self.ranks.device) for k, v in batch.items()}
                losses.append(self.engine(cast_floating(split_ids(batch)[0], self.dtype))["loss"].item())
        self.engine.train()
        return self.ranks.mean({"val_loss": sum(losses) / len(losses), "val_batches": float(len(losses))})

    def _checkpoint(self, state: dict, metrics: dict) -> None:
        """Every rank saves its part into the store (which makes it visible whole and prunes old ones).

        Nothing is reported to Ray Train: a checkpoint it knew of would enter its run snapshot, which it
        checks against storage when a run directory is used again and refuses to start when a listed
        checkpoint is gone (pruned here after the snapshot was last written). `resume` reads these
        checkpoints themselves, after a worker-group restart and after a new command alike.
        """
        local = all(bool(torch.isfinite(held_values(p)).all()) for p in self.engine.module.parameters())
        if not self.ranks.all_true(local):
            raise NonFiniteLoss(f"parameters are not finite at step {state['step']}; refusing to write a checkpoint")
        final = self.store.save(state["step"], {"state": state, "metrics": metrics},
                                lambda directory: self.engine.save_checkpoint(str(directory), tag="state",
                                                                              save_latest=False),
                                self.ranks, self.cfg.checkpoint.keep)
        if self.ranks.rank == 0:
            log.info("checkpoint %s", final)

    def save_final(self, model_config: dict, tokenizer_json: str, preprocess) -> None:
        """Consolidated fp32 weights (ZeRO-3 gathered) as a model bundle in <run dir>/final, written by rank 0."""
        import deepspeed

        from mmcore.bundle import ModelBundle

        params = list(self.engine.module.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.cfg.parallel.zero_stage == 3 \
            else contextlib.nullcontext()
        with gather:
            if self.ranks.rank == 0:
                model = self.engine.module.model
                if hasattr(model, "merge_adapters") and not model_config.get("adapters"):  # into the weights
                    model.merge_adapters()
                staging = storage.scratch_dir(self.run_dir) / ".final.tmp"
                with staged(staging):
                    ModelBundle.write(staging, model, model_config, tokenizer_json, preprocess)
                storage.publish(staging, self.run_dir / "final")
        self.ranks.barrier()
