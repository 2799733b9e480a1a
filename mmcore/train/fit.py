"""fit(cfg) -> TrainResult: preflight checks, Ray Train + DeepSpeed (or this process), then MLflow registration.

Reads in one screen: check data, open tracking, build streams, run the trainer, register.
The run name is stable (recipe, stage, dataset id, config hash), so running the same command
again resumes from the newest verified checkpoint, and a finished run returns its result.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from mmcore import registry, storage, tracking
from mmcore.console import say
from mmcore.config import RunConfig, to_dict
from mmcore.data.dataset import DatasetVersion
from mmcore.models import model_config
from mmcore.progress import progress_bar
from mmcore.train import checkpoint
from mmcore.train.plan import open_dataset, plan, run_name
from mmcore.train.parents import pin_parents


class TrainingError(RuntimeError):
    """Training failed inside Ray Train; the message names the worker rank(s) and the worker's own error."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


def training_error(error: BaseException) -> TrainingError:
    """Ray Train's WorkerGroupError (a page of every rank's traceback) -> one line about the first failure."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items())
        where = f"training worker rank {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    else:
        cause, where = getattr(error, "controller_failure", error), "the Ray Train controller"
    text = str(cause).strip().splitlines()
    return TrainingError(f"{where} failed: {type(cause).__name__}: {text[0] if text else ''}", cause)


@dataclass
class TrainResult:
    """What a training run produced and where to find it."""

    run_name: str
    run_dir: str
    dataset_id: str
    mlflow_run_id: str
    model_name: str
    model_version: str
    model_uri: str
    metrics: dict

    def save(self, path) -> None:
        """Never seen half-written (a kill mid-write would leave a run that cannot even say it finished)."""
        storage.write_text(path, json.dumps(asdict(self), indent=2))


def local_ray_cpus(num_cpus: int = 0) -> int:
    """Logical CPUs of a local Ray: `num_cpus`, else at least 4, so Ray Data tasks are not starved by
    the training workers on a 2-core machine."""
    return num_cpus or max(4, os.cpu_count() or 1)


def connect_ray(address: str = "", num_cpus: int = 0):
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), else start a local one; returns the ray module.

    A local Ray gets its dashboard on 127.0.0.1: Ray Train's placement-group cleaner asks the State
    API (served by the dashboard) whether the controller lives, every second of the run, and without
    it logs a failure each time. Logical CPUs: local_ray_cpus(). Ray starts a local cluster's GCS and
    raylet with PR_SET_PDEATHSIG, so the kernel kills them when the *thread* that started them ends: off
    the main thread (a fit() in a thread, a Prefect task runner's) a local Ray is started from a thread that
    lives as long as the process.
    """
    import ray
    import ray.data

    address = address or os.environ.get("RAY_ADDRESS", "")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            _outliving_this_thread(lambda: ray.init(num_cpus=local_ray_cpus(num_cpus), include_dashboard=True,
                                                    dashboard_host="127.0.0.1", configure_logging=False))
    from mmcore.data.stream import WaitWhenIdle

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # per-operator bars flood the log
    if WaitWhenIdle not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(WaitWhenIdle)
    return ray


def _outliving_this_thread(start) -> None:
    """Run `start` (which starts processes) here on the main thread, else on a daemon thread that stays
    alive until the process exits, so the processes do not die with the calling thread."""
    if threading.current_thread() is threading.main_thread():
        start()
        return
    done, failed = threading.Event(), []

    def keep() -> None:
        try:
            start()
        except BaseException as err:  # noqa: BLE001 - raised again in the calling thread
            failed.append(err)
        done.set()
        threading.Event().wait()

    threading.Thread(target=keep, name="mmpipe-local-ray", daemon=True).start()
    done.wait()
    if failed:
        raise failed[0]


def fit(cfg: RunConfig) -> TrainResult:
    """Train one stage on a dataset version and register the model with alias `cfg.tracking.alias`."""
    cfg.validate()
    runs = storage.path(cfg.cluster.storage_path) if cfg.cluster.storage_path else storage.root() / "runs"
    storage.check(runs)  # a bucket that cannot be used fails here, before any worker starts
    version = open_dataset(cfg)
    uri = tracking.resolve_uri(cfg.tracking)
    tracking.check_reachable(uri)
    parents = pin_parents(cfg, model_config(cfg.model.name), uri, version)
    cfg, arch = parents.cfg, parents.arch
    name = run_name(cfg, version.id, arch)
    runs = runs.absolute() if isinstance(runs, Path) else runs
    run_dir = runs / name
    if (run_dir / "result.json").exists():
        finished = TrainResult(**json.loads((run_dir / "result.json").read_text()))
        say(f"run {name} finished before: {finished.model_uri}, run directory {run_dir}")
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    mixed = {DatasetVersion.open(path).id: weight for path, weight in cfg.data.mix.items()}
    trained = (run_dir / "metrics.json").exists()  # written after the final bundle: training is over
    if trained:
        say(f"run {name} finished training before: registering its model, run directory {run_dir}")
    else:
        where = "in this process" if cfg.cluster.executor == "here" else f"{cfg.parallel.num_workers} workers"
        say(f"training {cfg.model.name} ({cfg.task.stage}, recipe {cfg.recipe}) on dataset {version.id}"
            + "".join(f" + {i} ({w:.0%} of the rows)" for i, w in mixed.items())
            + (f", {cfg.data.generated_share:.0%} of its captions by {cfg.data.captioner}" if cfg.data.captioner
               else "") + ": "
            f"{cfg.optim.max_steps} steps, {where}, ZeRO-{cfg.parallel.zero_stage}; "
            f"run directory {run_dir}")
        _say_resume_point(run_dir / "checkpoints")
    run_id = _mlflow_run(uri, cfg, name, version, run_dir)
    model_name = cfg.tracking.model_name or f"mmpipe-{cfg.task.stage}"
    tags = {"dataset_id": version.id, "stage": cfg.task.stage, "git_commit": tracking.git_commit(),
            "run_name": name, "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID", ""), **parents.tags,
            **({"mixed_datasets": json.dumps(mixed)} if mixed else {})}
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text()) if trained \
            else _train(cfg, version, arch, parents, run_dir, runs, name, uri, run_id)
        tracking.wait_until_reachable(uri, cfg.tracking.wait_s, f"register the model trained in {run_dir / 'final'}")
        final = storage.local_copy(run_dir / "final", storage.scratch_dir(run_dir) / "final")
        model_version = registry.log_and_register(uri, run_id, final, model_name, cfg.tracking.alias, tags)
    except BaseException:
        with contextlib.suppress(Exception):  # when the server is what failed, its error is the one to show
            tracking.end_run(uri, run_id, ok=False)
        raise
    tracking.end_run(uri, run_id, ok=True)
    if final != run_dir / "final":
        shutil.rmtree(final)  # the bundle's download, registered now
    result = TrainResult(name, str(run_dir), version.id, run_id, model_name, model_version,
                         f"models:/{model_name}/{model_version}", metrics)
    result.save(run_dir / "result.json")
    say(f"registered {result.model_uri} (alias {cfg.tracking.alias}), MLflow run {run_id}")
    return result


def _mlflow_run(uri: str, cfg: RunConfig, name: str, version: DatasetVersion, run_dir) -> str:
    """The MLflow run of this training run: made once (its id kept in the run directory as soon as it
    exists, so a killed command's run is the one the next command reopens), then started again."""
    id_file = run_dir / "mlflow_run_id"
    if not id_file.exists():
        storage.write_text(id_file, tracking.create_run(uri, cfg.tracking, name, version))
    run_id = id_file.read_text()
    tracking.start_run(uri, run_id, to_dict(cfg), version)
    return run_id


def _say_resume_point(root) -> None:
    """Which checkpoints a re-run found (the workers pick the newest that verifies)."""
    found = [path.name for path in checkpoint.checkpoints(root)]
    if found:
        say(f"resuming from the newest checkpoint that verifies: {', '.join(found)} in {root}")


def forget_ray_snapshot(run_dir) -> None:
    """Remove Ray Train's run snapshot from a run directory before Ray Train starts on it.

    mmpipe reports no checkpoint to Ray Train (loop._checkpoint), so the snapshot holds nothing a
    resume needs. One written by an earlier mmpipe lists checkpoints that retention may have deleted
    since, and Ray writes it in place, not atomically, so a kill can leave it cut short; either way
    Ray Train's controller refuses to start on the directory (CheckpointManagerInitializationError).
    """
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot = run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    if snapshot.exists():
        snapshot.unlink()


def ray_failure(error: BaseException, run_dir) -> TrainingError:
    """A Ray error outside the workers (the controller did not start) -> one line naming the run directory:
    the last `SomethingError: ...` line of Ray's report, its first sentence."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
    reason = lines[-1].split(". ")[0] if lines else type(error).__name__
    return TrainingError(f"Ray Train could not run {run_dir}: {reason}", error)


def _train(cfg, version, arch, parents, run_dir, runs, name, uri, run_id) -> dict:
    map_shards = None  # derived versions: computed in this process when training runs here
    if cfg.cluster.executor != "here":
        from mmcore.data.stream import derive_on_ray

        connect_ray(cfg.cluster.address, cfg.cluster.num_cpus)
        map_shards = derive_on_ray
    steps = plan(cfg, version, arch, cfg.parallel.num_workers, parents.dirs, map_shards, parents.captioner)
    (run_dir / "tokenizer.json").write_text(steps.tokenizer_json)
    if steps.skipped_validation:
        say(f"no validation: {steps.skipped_validation}")
    if cfg.cluster.executor == "here":
        from mmcore.train.here import run_here

        with tracking.system_metrics(uri, run_id), _training_bar(run_dir, cfg.optim.max_steps):
            return run_here(cfg, arch, steps, parents.dirs, run_dir,
                            lambda unsent: tracking.MetricLogger(uri, run_id, unsent))
    return _train_on_ray(cfg, arch, steps, run_dir, runs, name, uri, run_id)


def _train_on_ray(cfg, arch, steps, run_dir, runs, name, uri, run_id) -> dict:
    import ray.exceptions
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmcore.train.loop import train_loop_per_worker

    connect_ray(cfg.cluster.address, cfg.cluster.num_cpus)  # `ray` above is the module it connects
    use_gpu = cfg.parallel.use_gpu if cfg.parallel.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    forget_ray_snapshot(run_dir)
    # Validation is read in the worker itself (a Ray Data stream of it started three more Ray processes per
    # run, about 10 s on 2 cores).
    train_stream = {"units": steps.train_units, "cpus": train_stream_cpus(ray, cfg),
                    "preprocess": steps.train_preprocess}
    val_stream = {"units": steps.val_units, "preprocess": steps.val_preprocess} if steps.val_units else None
    loop_config = {
        "run": to_dict(cfg), "run_dir": str(run_dir), "model_config": arch, "tokenizer_json": steps.tokenizer_json,
        "preprocess": asdict(steps.preprocess),
        "tracking_uri": uri, "mlflow_run_id": run_id, "train_stream": train_stream, "val_stream": val_stream,
    }
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.parallel.num_workers, use_gpu=use_gpu,
                                               placement_strategy=cfg.cluster.placement_strategy),
        run_config=ray.train.RunConfig(name=name, storage_path=str(runs),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures)),
    )
    with tracking.system_metrics(uri, run_id), _training_bar(run_dir, cfg.optim.max_steps):
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise training_error(err) from err
        except ray.exceptions.RayError as err:
            raise ray_failure(err, run_dir) from err
    if result.error:
        raise training_error(result.error) from result.error
    return json.loads((run_dir / "metrics.json").read_text())


def train_stream_cpus(ray, cfg: RunConfig) -> float:
    """Logical CPUs each worker's train stream may hold: the data CPUs (those the workers do not
    hold) shared among the workers. (Ray Data's tasks are streaming generators that keep their CPU
    while backpressure pauses them, so a second stream beside these would have to be left a CPU.)"""
    data_cpus = ray.cluster_resources().get("CPU", 1) - cfg.parallel.num_workers
    return max(0.25, data_cpus / cfg.parallel.num_workers)


@contextlib.contextmanager
def _training_bar(run_dir, max_steps: int):
    """A progress bar of optimizer steps, fed from the `progress.json` that rank 0 writes."""
    done = threading.Event()

    def show_step(advance_to) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError):  # not written yet (or by an older version)
            progress = json.loads((run_dir / "progress.json").read_text())
            advance_to(progress["step"], f"loss {progress['loss']:.3f}  {progress['samples_per_second']:.0f} samples/s")

    def watch(advance_to) -> None:
        while not done.wait(2.0):
            show_step(advance_to)

    with progress_bar("training", max_steps) as advance_to:
        watcher = threading.Thread(target=watch, args=(advance_to,), name="mmpipe-training-bar", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            show_step(advance_to)
