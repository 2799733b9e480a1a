"""The README's main command, as a user runs it: `mmpipe demo` with nothing started by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mmcore.data.dataset import DatasetVersion


def test_demo_ingests_trains_evaluates_and_promotes(tmp_path):
    """The demo as the README runs it, with the quicker debug recipe to keep CI short."""
    cli = Path(sys.executable).with_name("mmpipe")
    env = dict(os.environ, MMPIPE_HOME=str(tmp_path / "home"), COLUMNS="120")
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
