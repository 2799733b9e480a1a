"""Prefect flows: ingest, train, evaluate (with the promotion gate) and retrain = all of them in a row.

Thin on purpose: each task calls one mmcore function and leaves a markdown artifact; flows add
orchestration (retries where a network or a cluster is touched, events, artifacts), nothing else.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.logging.handlers import APILogHandler

from mmcore import console, storage, tracking
from mmcore.config import TrackingConfig, project_home
from mmcore.data.dataset import MANIFEST, DatasetVersion
from mmcore.data.ingest import ingest
from mmcore.eval.gate import GateDecision, promote
from mmcore.eval.run import EvalReport, evaluate
from mmcore.progress import progress_listener
from mmcore.redact import RedactingFormatter
from mmcore.train.fit import TrainingError, fit
from mmcore.train.trainer import NonFiniteLoss
from pipelines import report
from pipelines.params import EvaluateParams, GateParams, IngestParams, InferParams, RetrainParams, TrainParams, mixed

DATASET_LANDED = "dataset.landed"
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NonFiniteLoss)
"""Failures a retry cannot fix: bad parameters, bad files, a diverging run. Anything else is retried."""


def _retry_unless_user_error(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    try:
        state.result()
    except TrainingError as err:  # a worker's error: judged by what the worker raised
        return not isinstance(err.cause, USER_ERRORS)
    except USER_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - a network, cluster or server failure: worth another try
        return True
    return False


# Retries only where a network (downloads, MLflow) or a cluster (Ray) is touched, with backoff.
infrastructure = dict(retries=2, retry_delay_seconds=[15, 60], retry_condition_fn=_retry_unless_user_error)


class ProgressArtifacts:
    """Mirrors mmcore's progress bars as Prefect progress artifacts, one per bar, every few seconds."""

    def __init__(self, every_s: float = 3.0):
        self.context = contextvars.copy_context()  # the task run's, for updates from a watcher thread
        self.every_s, self.ids, self.sent = every_s, {}, {}

    def __call__(self, description: str, done: int, total: int) -> None:
        last = self.sent.get(description)
        if last is not None and done < total and time.monotonic() - last < self.every_s:
            return
        self.sent[description] = time.monotonic()
        try:
            self.context.run(self._send, description, 100.0 * done / max(total, 1))
        except Exception as err:  # noqa: BLE001 - a lost progress update never fails the work
            print(f"progress artifact not updated: {err}")

    def _send(self, description: str, percent: float) -> None:
        if description in self.ids:
            update_progress_artifact(self.ids[description], percent)
        else:
            self.ids[description] = create_progress_artifact(percent, description=description)


class RunLogs(APILogHandler):
    """mmpipe's own lines (stage start and end, figures, errors) in the flow run's logs in the Prefect UI,
    secrets masked."""

    def __init__(self):
        super().__init__()
        self.setFormatter(RedactingFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() or TaskRunContext.get():  # outside a run they stay in the console and log file
            super().emit(record)


def _console(flow_name: str) -> None:
    """At the start of every flow: mmpipe's lines go to the run's logs; in a flow-run process of its own
    (started by `mmpipe serve` or a Prefect worker) the libraries' output goes to a log file under the
    project home, as for `mmpipe` commands (MMPIPE_VERBOSE=1 keeps it on the console)."""
    if not any(isinstance(h, RunLogs) for h in console.log.handlers):
        console.log.addHandler(RunLogs())
    console.log.setLevel(logging.INFO)
    if os.environ.get("PREFECT__FLOW_RUN_ID") and console.log_file() is None:
        console.configure(project_home() / "logs", f"flow-{flow_name}", console.verbose_from_env())


@task(name="ingest", **infrastructure)
def ingest_task(params: IngestParams) -> dict:
    """Download, filter and version a URL list (mmcore.data.ingest); the same list and settings are reused."""
    cfg = params.to_config()
    out = storage.path(cfg.out)
    if not params.out and (out / MANIFEST).exists():
        version = DatasetVersion.open(out)
        problems = version.verify()
        if problems:
            raise ValueError(f"{out} exists but fails verification: {problems[:3]}; remove it to ingest again")
        get_run_logger().info("%s was ingested before from the same list and settings: reusing it", out)
        new = False
    else:
        with progress_listener(ProgressArtifacts()):
            version = ingest(cfg)
        new = True
    summary = {**report.dataset_summary(version), "new": new}
    create_markdown_artifact(report.dataset_markdown(summary), key="mmpipe-dataset",
                             description=f"dataset {version.id}")
    return summary


@task(name="train", **infrastructure)
def train_task(params: TrainParams) -> dict:
    """Train a stage on Ray Train + DeepSpeed and register the model (mmcore.train.fit)."""
    cfg = params.to_config(params.dataset)
    with progress_listener(ProgressArtifacts()):
        result = asdict(fit(cfg))
    uri = tracking.resolve_uri(cfg.tracking)
    links = tracking.ui_links(uri, result["mlflow_run_id"], (result["model_name"], result["model_version"]))
    create_markdown_artifact(report.training_markdown(result, cfg.tracking.alias, links), key="mmpipe-training",
                             description=f"{result['model_uri']} ({result['run_name']})")
    return result


@task(name="evaluate", **infrastructure)
def evaluate_task(model_uri: str, dataset: str, suites: list[str], classes: str = "") -> EvalReport:
    """Run the eval suites on a registered model, loaded from the registry alone (mmcore.eval.run)."""
    evaluation = evaluate(model_uri, dataset, suites or None, classes=classes or None)
    create_markdown_artifact(report.evaluation_markdown(evaluation, _links(evaluation)), key="mmpipe-evaluation",
                             description=f"{evaluation.model_name} v{evaluation.model_version}")
    return evaluation


@task(name="promote", **infrastructure)
def promote_task(model_name: str, dataset: str, gate: GateParams) -> GateDecision:
    """Evaluate @candidate and @champion on the same data; move `champion` only on a clear win."""
    decision = promote(model_name, dataset, gate.to_config(), gate.suites or None, classes=gate.classes or None)
    create_markdown_artifact(report.gate_markdown(decision, _links(decision.candidate)), key="mmpipe-evaluation",
                             description=f"{model_name} v{decision.candidate_version}: "
                                         f"{'promoted' if decision.promoted else 'refused'}")
    return decision


@task(name="infer", **infrastructure)
def infer_task(params: InferParams) -> dict:
    """A registered model over every row of a dataset version (mmcore.infer): computed once, then reused."""
    from mmcore.infer import infer

    derived, seconds = infer(params.model, params.dataset, params.output, ray_address=params.ray_address)
    m = derived.manifest
    summary = {"path": str(derived.path), "kind": m["kind"], "model": m["model"], "dataset_id": m["dataset_id"],
               "rows": sum(s["rows"] for s in m["shards"]), "shards": len(m["shards"]), "computed": derived.computed,
               "columns": m["columns"], "seconds": round(seconds, 1)}
    create_markdown_artifact(report.derived_markdown(summary), key="mmpipe-derived",
                             description=f"{m['kind']} of dataset {m['dataset_id']} by {m['model']}")
    return summary


@task(name="search", **infrastructure)
def search_task(trained: dict, dataset: str, queries: list[str], ray_address: str = "") -> list[str]:
    """Each query's contact sheet in `dataset` by the model `trained` (a train task's result), attached to its
    MLflow run under search/: what the new model finds, seen beside its metrics."""
    import tempfile

    from mmcore.search import Searchable, slug

    uri = tracking.resolve_uri(TrackingConfig())
    searchable = Searchable.open(dataset, trained["model_uri"], ray_address=ray_address)
    with tempfile.TemporaryDirectory() as tmp:
        for i, query in enumerate(queries):
            result = searchable.search(query, out=str(Path(tmp) / f"{i:02d}-{slug(query)}.png"))
            tracking.log_file(uri, trained["mlflow_run_id"], result.sheet, "search")
    console.say(f"contact sheets of {len(queries)} search(es) by {trained['model_uri']} attached to its run (search/)")
    return [f"search/{i:02d}-{slug(query)}.png" for i, query in enumerate(queries)]


def _links(evaluation: EvalReport) -> dict[str, str]:
    uri = tracking.resolve_uri(TrackingConfig())
    return tracking.ui_links(uri, evaluation.mlflow_run_id, (evaluation.model_name, evaluation.model_version))


@flow(name="ingest", log_prints=True)
def ingest_flow(params: IngestParams) -> dict:
    """URL list -> guarded img2dataset download -> filters -> dataset version; announces `dataset.landed`.

    Only a new version is announced: a re-run that reuses one does not start another retrain.
    """
    _console("ingest")
    summary = ingest_task(params)
    if summary["new"]:
        emit_event(DATASET_LANDED, resource={"prefect.resource.id": f"mmpipe.dataset.{summary['id']}",
                                             "prefect.resource.name": summary["path"]},
                   payload={"path": summary["path"], "id": summary["id"], "rows": summary["rows"]})
    return summary


@flow(name="train", log_prints=True)
def train_flow(params: TrainParams) -> dict:
    """Train one stage on a dataset version; the model is registered with alias `candidate`."""
    _console("train")
    return train_task(params)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvaluateParams) -> dict:
    """Evaluate `model@candidate`; with `promote`, run the gate against `model@champion`."""
    _console("evaluate")
    if params.promote:
        decision = promote_task(params.model, params.dataset, params)
        return report.decision_summary(decision)
    evaluation = evaluate_task(f"models:/{params.model}@candidate", params.dataset, params.suites, params.classes)
    return report.evaluation_summary(evaluation)


@flow(name="infer", log_prints=True)
def infer_flow(params: InferParams) -> dict:
    """A registered model's embeddings, CLIP scores, image codes or captions of every row of a dataset version,
    kept beside it as a derived version (reused by every later run with the same pair)."""
    _console("infer")
    return infer_task(params)


@dataclass
class RetrainResult:
    dataset: dict
    """dataset_summary() of the version trained on."""
    trained: dict | None
    """The contrastive TrainResult, as a dict (None when skipped)."""
    decision: GateDecision | None
    language: dict | None = None
    """The language stage's TrainResult, as a dict (None when skipped)."""
    language_decision: GateDecision | None = None
    fusion: dict | None = None
    """The fusion TrainResult, as a dict (None when skipped)."""
    fusion_decision: GateDecision | None = None
    tokenizer: dict | None = None
    """The image tokenizer's TrainResult, as a dict (None when skipped)."""
    tokenizer_decision: GateDecision | None = None
    unified: dict | None = None
    """The unified TrainResult, as a dict (None when skipped)."""
    unified_decision: GateDecision | None = None
    instructions: dict | None = None
    """dataset_summary() of the instruction dataset the fusion, language and unified stages trained on, the last
    two with `dataset` mixed in (None: they used `dataset` alone)."""

    def stages(self) -> list[tuple[dict, GateDecision | None]]:
        """(TrainResult dict, gate decision) of each stage that ran, in order."""
        pairs = [(self.trained, self.decision), (self.language, self.language_decision),
                 (self.fusion, self.fusion_decision),
                 (self.tokenizer, self.tokenizer_decision), (self.unified, self.unified_decision)]
        return [(trained, decision) for trained, decision in pairs if trained]

    def candidates(self) -> list[EvalReport]:
        """The evaluation of each stage's candidate on `dataset`, in order (side by side on one test split: a
        fusion stage gated on an instruction dataset is left out)."""
        return [decision.candidate for _, decision in self.stages()
                if decision is not None and decision.candidate.dataset_id == self.dataset["id"]]


@flow(name="retrain", log_prints=True)
def retrain_flow(params: RetrainParams) -> RetrainResult:
    """ingest (or a landed dataset, and a conversation file's instruction dataset) -> contrastive -> language ->
    fusion on the contrastive (and language) champion, in one phase or LLaVA's two, on the instruction dataset (or
    the captions) -> image tokenizer -> unified on the tokenizer champion, each trained, evaluated and promoted (an
    alignment phase is not gated: the next phase starts from it); the language and unified stages train on the
    instruction dataset with the captions mixed in (params.mixed). Stages can be skipped."""
    _console("retrain")
    dataset = ingest_task(params.source) if params.source else report.dataset_summary(
        DatasetVersion.open(params.dataset))
    result = RetrainResult(dataset, None, None)
    result.instructions = ingest_task(params.instructions) if params.instructions else None
    chats, weight = result.instructions["path"] if result.instructions else None, params.instructions_weight
    if not params.skip_contrastive:
        result.trained = train_task(TrainParams(dataset=dataset["path"], **params.train.model_dump()))
        if params.search_queries:
            search_task(result.trained, dataset["path"], params.search_queries, params.train.ray_address)
        result.decision = promote_task(result.trained["model_name"], dataset["path"], params.gate)
    if not params.skip_language:
        result.language = train_task(mixed(params.language, dataset["path"], chats, weight))
        result.language_decision = promote_task(result.language["model_name"], dataset["path"], params.language_gate)
    if not params.skip_fusion:
        for phase in params.fusion.phases(dataset["path"], chats):
            result.fusion = train_task(phase)
        gated_on = chats if chats and params.fusion_gated_on == "instructions" else dataset["path"]
        result.fusion_decision = promote_task(result.fusion["model_name"], gated_on, params.fusion_gate)
    if not params.skip_unified:
        result.tokenizer = train_task(TrainParams(dataset=dataset["path"], **params.tokenizer.model_dump()))
        result.tokenizer_decision = promote_task(result.tokenizer["model_name"], dataset["path"],
                                                 params.tokenizer_gate)
        result.unified = train_task(mixed(params.unified, dataset["path"], chats, weight, "data.draw_fraction=1.0"))
        result.unified_decision = promote_task(result.unified["model_name"], dataset["path"], params.unified_gate)
    candidates = result.candidates()
    if len(candidates) >= 2:
        create_markdown_artifact(report.stages_markdown(candidates), key="mmpipe-stages",
                                 description="the stages' candidates side by side on the suites they share")
    return result
