"""Markdown for the Prefect artifacts and JSON-able summaries for flow results."""

from __future__ import annotations

from mmcore.data.dataset import DatasetVersion
from mmcore.eval.gate import GateDecision
from mmcore.eval.run import EvalReport, side_by_side


def dataset_summary(version: DatasetVersion) -> dict:
    m = version.manifest
    return {"path": str(version.path), "id": m["id"], "rows": m["rows"], "splits": m["splits"],
            "source": m["source"]["path"], "shards": len(m["shards"])}


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _links(links: dict[str, str]) -> str:
    return "\n".join(f"- {name}: {target}" for name, target in links.items())


def dataset_markdown(summary: dict) -> str:
    rows = summary["rows"]
    rejected = sorted(rows["rejected"].items(), key=lambda kv: -kv[1])
    head = [("path", f"`{summary['path']}`"), ("source", f"`{summary['source']}`"), ("rows in", rows["in"]),
            ("kept", rows["kept"]), ("rejected", sum(rows["rejected"].values())),
            ("splits", ", ".join(f"{k} {v}" for k, v in summary["splits"].items())), ("shards", summary["shards"])]
    text = f"# Dataset {summary['id']}\n\n" + _table(("", ""), head)
    if rejected:
        text += "\n\n## Rejected rows by reason\n\n" + _table(("reason", "rows"), rejected)
    return text


def derived_markdown(summary: dict) -> str:
    """A derived version (the `infer` flow): what, by which model, of which dataset, computed or stored."""
    head = [("model", summary["model"]), ("dataset", summary["dataset_id"]), ("rows", summary["rows"]),
            ("shards", f"{summary['computed']} computed, {summary['shards'] - summary['computed']} stored before "
                       f"({summary['seconds']} s)"), ("columns", ", ".join(summary["columns"])),
            ("path", f"`{summary['path']}`")]
    return f"# {summary['kind']} of dataset {summary['dataset_id']}\n\n" + _table(("", ""), head)


def training_markdown(result: dict, alias: str, links: dict[str, str]) -> str:
    metrics = result["metrics"]
    shown = [(k, f"{metrics[k]:.4g}") for k in ("loss", "val_loss", "samples_per_second", "bad_steps",
                                                 "tracking_failures", "tracking_lost", "resumed_from") if k in metrics]
    return (f"# Trained {result['model_uri']} (@{alias})\n\n"
            f"- run: `{result['run_name']}` in `{result['run_dir']}`\n- dataset: {result['dataset_id']}\n"
            f"{_links(links)}\n\n" + _table(("metric", "value"), shown))


def _report_table(evaluation: EvalReport) -> str:
    rows = [(suite, key + (" (primary)" if key == evaluation.primaries[suite] else ""), f"{value:.4f}")
            for suite, metrics in evaluation.metrics.items() for key, value in metrics.items()]
    rows += [(suite, "FAILED", error[:300].replace("|", "/")) for suite, error in evaluation.errors.items()]
    return _table(("suite", "metric", "value"), rows)


def evaluation_markdown(evaluation: EvalReport, links: dict[str, str]) -> str:
    return (f"# Evaluation of {evaluation.model_name} v{evaluation.model_version}\n\n"
            f"- dataset: {evaluation.dataset_id}\n{_links(links)}\n\n" + _report_table(evaluation))


def gate_markdown(decision: GateDecision, links: dict[str, str]) -> str:
    word = "PROMOTED to champion" if decision.promoted else "not promoted"
    text = (f"# {decision.model_name} v{decision.candidate_version}: {word}\n\n{decision.reason}\n\n"
            f"- champion before: {decision.champion_version or 'none'}\n{_links(links)}\n\n"
            f"## Candidate\n\n" + _report_table(decision.candidate))
    if decision.champion is not None:
        text += f"\n\n## Champion (v{decision.champion_version})\n\n" + _report_table(decision.champion)
    return text


def stages_markdown(reports: list[EvalReport]) -> str:
    """The candidates of a retrain's stages side by side on the suites they share."""
    columns, rows = side_by_side(reports)
    if not rows:
        return "# The stages side by side\n\nThe stages that ran share no evaluation suite."
    cells = [(suite, key, *("-" if v is None else f"{v:.4f}" for v in values)) for suite, key, values in rows]
    return ("# The stages side by side\n\nEach stage's candidate on the suites at least two of them ran "
            f"(dataset {reports[0].dataset_id}).\n\n" + _table(("suite", "metric", *columns), cells))


def evaluation_summary(evaluation: EvalReport) -> dict:
    return {"model": f"{evaluation.model_name}/{evaluation.model_version}", "ok": evaluation.ok,
            "metrics": evaluation.metrics, "errors": evaluation.errors, "mlflow_run_id": evaluation.mlflow_run_id}


def decision_summary(decision: GateDecision) -> dict:
    return {"promoted": decision.promoted, "reason": decision.reason,
            "candidate_version": decision.candidate_version, "champion_before": decision.champion_version,
            "evaluation": evaluation_summary(decision.candidate)}
