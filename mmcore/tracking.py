"""MLflow runs and metrics: the tracking URI, a training run's MLflow run (params, dataset lineage, system
metrics), rank 0's metric logger, evaluation records, and links into the MLflow UI.

The registry (registering and fetching models) is mmcore/registry.py, the pyfunc a registered model is
mmcore/pyfunc.py, the files it holds mmcore/bundle.py (no MLflow).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient

from mmcore.config import TrackingConfig, project_home
from mmcore.redact import redact


class TrackingError(RuntimeError):
    """MLflow cannot be reached or refused a request."""


def resolve_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI (a server, e.g. from `mmpipe up`), else the project's sqlite."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail fast, before any worker starts, when the tracking server does not answer."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with quick_http():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unreachable server
        raise TrackingError(f"MLflow at {uri} is not reachable: {str(err).splitlines()[0][:300]}") from None


@contextlib.contextmanager
def quick_http():
    """Fewer retries and a short timeout: for a probe, and for calls that must not hold training up."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, made if new (under sqlite, its artifacts beside the database)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the working directory
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def create_run(uri: str, cfg: TrackingConfig, run_name: str, dataset) -> str:
    """A new MLflow run for a training run; returns its id (keep it at once: see start_run)."""
    client = MlflowClient(uri)
    run = client.create_run(_experiment_id(client, cfg.experiment, uri), run_name=run_name,
                            tags={"mmpipe.git_commit": git_commit(), "mmpipe.dataset_id": dataset.id})
    return run.info.run_id


def create_import_run(uri: str, experiment: str, source: str, revision: str, stage: str) -> str:
    """A run for a checkpoint's import (hub.py), RUNNING, with the source and revision as params."""
    client = MlflowClient(uri)
    run = client.create_run(_experiment_id(client, experiment, uri), run_name=f"import-{stage}",
                            tags={"mmpipe.git_commit": git_commit(), "mmpipe.source": source})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in
                                              {"source": source, "revision": revision, "stage": stage}.items()])
    return run.info.run_id


def start_run(uri: str, run_id: str, params: dict, dataset) -> None:
    """Mark the run RUNNING; the first time (no params yet, also after a kill right after create_run),
    log its params and dataset lineage.

    The run stays RUNNING until `end_run`: MLflow's system-metrics monitor stops at any other status.
    """
    client = MlflowClient(uri)
    if not client.get_run(run_id).data.params:
        client.log_batch(run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items()])
        client.log_text(run_id, json.dumps(dataset.manifest, indent=2), "dataset/manifest.json")
        with warnings.catch_warnings():  # MLflow registers two identical local sources (schemes "" and "file")
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(str(dataset.path))
        meta = MetaDataset(source, name=f"mmpipe-{dataset.id}", digest=dataset.id)
        client.log_inputs(run_id, datasets=[DatasetInput(meta._to_mlflow_entity(),
                                                         tags=[InputTag("mlflow.data.context", "training")])])
    client.update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, ok: bool) -> None:
    MlflowClient(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


@contextlib.contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API (start_run, log_model, download_artifacts, system metrics) reads one
    process-wide URI, and set_tracking_uri also exports it as $MLFLOW_TRACKING_URI, which resolve_uri
    reads: both are put back after the block, so one run's URI never becomes a later run's default."""
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str):
    """CPU/GPU/memory sampled into the run while the block runs (MLflow's system metrics monitor)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with fluent_uri(uri):
        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()


class MetricLogger:
    """Rank 0's metric writer. Training never waits for the server: points it does not take are
    kept, in order with their original time and step, and sent with later ones, retried with
    backoff (1 s doubling to 60 s); `close` waits for it to take the rest.

    `unsent()` goes into each checkpoint and `kept` takes it back on resume, so points kept while the
    server was down outlive a rank 0 that dies; MLflow stores a point sent twice (same key, value,
    time and step) once."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch
    FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0

    def __init__(self, uri: str, run_id: str, kept: list[list] = ()):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.pending: list[Metric] = [Metric(key, value, timestamp, step) for key, value, timestamp, step in kept]
        self.failures, self.last_error = 0, ""
        self.retry_at, self.backoff = 0.0, self.FIRST_BACKOFF_S

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() >= self.retry_at:
            self._flush(step)

    def _flush(self, step: int | None = None) -> bool:
        try:
            with quick_http():
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[: self.BATCH])
                    del self.pending[: self.BATCH]
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unreachable server
            self.failures += 1
            self.last_error = str(err).splitlines()[0][:300]
            self.retry_at = time.monotonic() + self.backoff
            print(f"mmpipe: warning: MLflow did not take the metrics{'' if step is None else f' of step {step}'} "
                  f"({len(self.pending)} points kept, retry in {self.backoff:.0f} s): {self.last_error}", flush=True)
            self.backoff = min(2 * self.backoff, self.MAX_BACKOFF_S)
            return False
        self.backoff = self.FIRST_BACKOFF_S
        return True

    def unsent(self) -> list[list]:
        """The points the server has not taken yet, as plain data (for a checkpoint's manifest)."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self.pending]

    def close(self, wait_s: float) -> int:
        """Wait up to `wait_s` for the server to take the points still kept; returns how many it never took."""
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self.retry_at, deadline) - time.monotonic()))
            self._flush()
        if self.pending:
            print(f"mmpipe: warning: MLflow did not answer for {wait_s:.0f} s: {len(self.pending)} metric points "
                  f"of run {self.run_id} are lost ({self.last_error})", flush=True)
        return len(self.pending)


def wait_until_reachable(uri: str, wait_s: float, what: str) -> None:
    """Poll the server until it answers, at most `wait_s`; then a TrackingError that says what waited."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_reachable(uri)
        except TrackingError as err:
            if time.monotonic() >= deadline:
                raise TrackingError(f"{err} (waited {wait_s:.0f} s to {what})") from None
            time.sleep(2.0)


def log_evaluation(tracking_uri: str, experiment: str, name: str, version: str, dataset, results: dict) -> str:
    """One MLflow run per evaluation: metrics per suite, a table per suite, figures; linked to the version."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(_experiment_id(client, experiment, tracking_uri), run_name=f"eval-{name}-v{version}",
                            tags={"mmpipe.model_name": name, "mmpipe.model_version": version,
                                  "mmpipe.dataset_id": dataset.id, "mmpipe.kind": "evaluation"})
    run_id = run.info.run_id
    client.log_param(run_id, "model_uri", f"models:/{name}/{version}")
    client.log_param(run_id, "dataset", str(dataset.path))
    for suite_name, outcome in results.items():
        if outcome.get("error"):
            client.set_tag(run_id, f"suite.{suite_name}.error", outcome["error"][:5000])
            continue
        if outcome.get("not_applicable"):
            client.set_tag(run_id, f"suite.{suite_name}.not_applicable", outcome["not_applicable"])
            continue
        result = outcome["result"]
        for key, value in result.metrics.items():
            client.log_metric(run_id, f"{suite_name}.{key}", float(value))
        for table_name, frame in result.tables.items():
            client.log_table(run_id, data=frame, artifact_file=f"{suite_name}/{table_name}.json")
        for file_name, png in result.figures.items():
            _log_bytes(client, run_id, png, f"{suite_name}/{file_name}")
    ok = all(not outcome.get("error") for outcome in results.values())
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    return run_id


def log_file(uri: str, run_id: str, path: Path, artifact_dir: str) -> None:
    """Attach the file at `path` to the run `run_id`, under `artifact_dir`."""
    MlflowClient(uri).log_artifact(run_id, str(path), artifact_dir)


def _log_bytes(client: MlflowClient, run_id: str, data: bytes, artifact_path: str) -> None:

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_path).name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), str(Path(artifact_path).parent))


def ui_links(tracking_uri: str, run_id: str | None = None, model: tuple[str, str] | None = None) -> dict[str, str]:
    """Where to look in the MLflow UI: links for a server, the command that opens a local store otherwise."""
    if not tracking_uri.startswith(("http://", "https://")):
        return {"MLflow UI": f"`mlflow ui --backend-store-uri {tracking_uri}`"}
    base, links = tracking_uri.rstrip("/"), {}
    if run_id:
        experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        links["MLflow run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if model:
        links["model version"] = f"{base}/#/models/{model[0]}/versions/{model[1]}"
    return links
