"""evaluate(uri, dataset) -> EvalReport: a registered model, loaded from MLflow alone, through suites."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmcore import console, registry, tracking
from mmcore.config import TrackingConfig
from mmcore.data.dataset import DatasetVersion
from mmcore.eval import contrastive  # noqa: F401 - registers the contrastive suites
from mmcore.eval import drawing  # noqa: F401 - registers the text-to-image suite
from mmcore.eval import generative  # noqa: F401 - registers the generative suites
from mmcore.eval import reconstruction  # noqa: F401 - registers the image tokenizer's suite
from mmcore.eval import text  # noqa: F401 - registers the language models' suite
from mmcore.eval.suites import default_suites, get_suite
from mmcore.models import capabilities
from mmcore.progress import progress_bar

EVAL_EXPERIMENT = "mmpipe-eval"


@dataclass
class EvalReport:
    """What an evaluation found; `ok` is False if any suite failed (the gate then refuses)."""

    model_name: str
    model_version: str
    dataset_id: str
    mlflow_run_id: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """suite -> metric -> value, for the suites that ran."""
    primaries: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """suite -> error, for the suites that failed."""
    not_applicable: dict[str, str] = field(default_factory=dict)
    """suite -> why it does not apply to the dataset (Suite.not_applicable): not run, not a failure."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def metric(self, dotted: str) -> float | None:
        suite_name, _, key = dotted.partition(".")
        return self.metrics.get(suite_name, {}).get(key)

    def summary(self) -> str:
        return "; ".join(f"{s}.{p}={self.metrics[s][p]:.4f}" for s, p in self.primaries.items())


def side_by_side(reports: list[EvalReport], primary_only: bool = False
                 ) -> tuple[list[str], list[tuple[str, str, list[float | None]]]]:
    """The models of `reports` on the suites that at least two of them ran: the columns ("name vN") of
    the models with a value in them, and rows of (suite, metric, a value or None per column), the
    metrics at least two of them have. The stages of one retrain compared where they can be
    (compositional for all three, VQA and captioning for fusion and unified). `primary_only`: each
    suite's primary metric alone."""
    rows = []
    for suite_name in dict.fromkeys(s for r in reports for s in r.metrics):
        keys = dict.fromkeys(k for r in reports for k in r.metrics.get(suite_name, {})
                             if k != "n" and not k.startswith("chance")
                             and (not primary_only or k == r.primaries.get(suite_name)))
        for key in keys:
            values = [r.metrics.get(suite_name, {}).get(key) for r in reports]
            if sum(v is not None for v in values) >= 2:
                rows.append((suite_name, key, values))
    kept = [i for i in range(len(reports)) if any(values[i] is not None for _, _, values in rows)]
    return ([f"{reports[i].model_name} v{reports[i].model_version}" for i in kept],
            [(suite_name, key, [values[i] for i in kept]) for suite_name, key, values in rows])


def evaluate(uri: str, dataset: str, suites: list[str] | None = None,
             tracking_cfg: TrackingConfig | None = None, classes: str | None = None) -> EvalReport:
    """Load `uri` (models:/name@alias or /version) from the registry and run the suites on `dataset`;
    `classes`: a classes file for the zeroshot suite (eval/contrastive.py).

    Unknown models, aliases or suites, a suite the model cannot take, or an unreachable
    MLflow fail before anything runs; a suite that fails while running is recorded in the report.
    """
    tracking_uri = tracking.resolve_uri(tracking_cfg or TrackingConfig())
    tracking.check_reachable(tracking_uri)
    name, version = registry.resolve_version(uri, tracking_uri)
    data = DatasetVersion.open(dataset)
    model, preprocess = registry.load_model(f"models:/{name}/{version}", tracking_uri)
    can = capabilities(model)
    selected = [get_suite(s, can) for s in (suites or default_suites(can))]
    options = {"classes": classes} if classes else {}
    console.say(f"evaluating models:/{name}/{version} on dataset {data.id}: {', '.join(s.name for s in selected)}")
    results = {}
    with progress_bar("evaluating", len(selected)) as advance_to:
        for done, suite in enumerate(selected):
            advance_to(done, suite.name)
            reason = suite.not_applicable(data, options)
            if reason:
                results[suite.name] = {"not_applicable": reason}
                continue
            try:
                results[suite.name] = {"result": suite.run(model, preprocess, data,
                                                           **{k: options[k] for k in suite.options})}
            except Exception as err:  # noqa: BLE001 - recorded, and the gate refuses a partial evaluation
                results[suite.name] = {"error": f"{type(err).__name__}: {err}"}
                console.log.exception("suite %s failed on %s/%s", suite.name, name, version)
        advance_to(len(selected), "")
    run_id = tracking.log_evaluation(tracking_uri, EVAL_EXPERIMENT, name, version, data, results)
    report = EvalReport(name, version, data.id, run_id,
                        metrics={k: v["result"].metrics for k, v in results.items() if "result" in v},
                        primaries={k: v["result"].primary for k, v in results.items() if "result" in v},
                        errors={k: v["error"] for k, v in results.items() if "error" in v},
                        not_applicable={k: v["not_applicable"] for k, v in results.items() if "not_applicable" in v})
    registry.tag_version(name, version, {"eval.run_id": run_id, "eval.dataset_id": data.id,
                                         "eval.summary": report.summary() or "-",
                                         "eval.ok": str(report.ok).lower()}, tracking_uri)
    failed = f"; FAILED: {', '.join(report.errors)}" if report.errors else ""
    for suite_name, reason in report.not_applicable.items():
        console.say(f"not applicable: {suite_name} ({reason})")
    console.say(f"evaluated {name} v{version}: {report.summary() or '-'}{failed} (MLflow run {run_id})")
    return report
