"""The README's main command, as a user runs it: `mmpipe demo` with nothing started by hand."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from mmcore.data.dataset import DatasetVersion


def test_demo_ingests_trains_evaluates_and_promotes(tmp_path):
    """The demo as the README runs it (a Prefect `retrain` flow run), with the quicker debug recipe."""
    cli = Path(sys.executable).with_name("mmpipe")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(MMPIPE_HOME=str(tmp_path / "home"), COLUMNS="120")
    result = subprocess.run([str(cli), "demo", "--recipe", "debug"], capture_output=True, text=True, timeout=900,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    datasets = list((tmp_path / "home" / "datasets").iterdir())
    assert len(datasets) == 1
    version = DatasetVersion.open(datasets[0])
    assert version.verify() == []
    rows = version.manifest["rows"]
    assert rows["kept"] > 3800 and rows["in"] == 4054
    assert version.id in result.stdout and "rejected rows by reason" in result.stdout
    assert set(version.manifest["splits"]) == {"train", "val", "test"}
    assert "registered models:/mmpipe-contrastive/1 (alias candidate)" in result.stdout
    assert "mmpipe-contrastive v1 promoted to champion: no 'champion' yet" in result.stdout
    assert "zeroshot-digits" in result.stdout and "compositional" in result.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("mmpipe-contrastive", "champion").version) == "1"
    # The demo ran as Prefect flow runs, recorded in the project home's Prefect database (what `mmpipe up` shows).
    with sqlite3.connect(tmp_path / "home" / "prefect" / "prefect.db") as db:
        runs = db.execute("select flow.name, flow_run.state_type from flow_run join flow on flow.id = "
                          "flow_run.flow_id").fetchall()
        tasks = {name.split("-")[0] for (name,) in db.execute("select name from task_run")}
    assert runs == [("retrain", "COMPLETED")]
    assert {"ingest", "train", "promote"} <= tasks
