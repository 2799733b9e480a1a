"""Every evaluation metric in two project homes' MLflow, side by side: which differ at the fourth decimal.

Usage: python experiments/same-figures/compare.py HOME_BEFORE HOME_AFTER
"""

from __future__ import annotations

import sys

from mlflow.tracking import MlflowClient


def figures(home: str) -> dict[tuple[str, str], float]:
    """(model name, suite.metric) -> value, rounded to 4 decimals, of every evaluation run in `home`."""
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("mmpipe-eval")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return {(run.data.tags["mmpipe.model_name"], key): round(value, 4)
            for run in runs for key, value in run.data.metrics.items()}


def main() -> None:
    before, after = (figures(home) for home in sys.argv[1:3])
    keys = sorted(before.keys() | after.keys())
    differ = [key for key in keys if before.get(key) != after.get(key)]
    for model, metric in differ:
        print(f"{model} {metric}: {before.get((model, metric))} -> {after.get((model, metric))}")
    print(f"{len(keys) - len(differ)} of {len(keys)} evaluation figures equal to the fourth decimal")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
