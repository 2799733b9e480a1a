"""The README's main command, as a user runs it: `mmpipe demo` with nothing started by hand."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from mmcore.data.dataset import DatasetVersion

CONSOLE_LINES = 202
"""The most lines the debug demo may print: stage lines, the progress bars, the dataset summary, a
table per stage's evaluation and one of the stages side by side (four stages: 167 lines before the
side-by-side table's 9, most of them the tables), where things are; the unified stage's image codes computed
for its two datasets, a line and a bar each (191 in all); the search queries' embeddings (a line and a bar), the
line that says where their contact sheets are and the derived version's two lines in the dataset summary (198).
(It printed about 250 for one stage before the libraries' output went to the log file.)"""


def test_demo_ingests_trains_evaluates_and_promotes(tmp_path):
    """The demo as the README runs it (a Prefect `retrain` flow run, all four stages), in its quick form: the
    debug recipes on a smaller sample corpus."""
    cli = Path(sys.executable).with_name("mmpipe")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(MMPIPE_HOME=str(tmp_path / "home"), COLUMNS="120")
    result = subprocess.run([str(cli), "demo", "--quick"], capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_console_is_mmpipe_own(result.stdout + result.stderr)
    datasets = {v.kind: v for v in map(DatasetVersion.open, (tmp_path / "home" / "datasets").iterdir())}
    assert set(datasets) == {"captions", "instructions"}, "the URL list and the corpus's conversation file"
    version, chats = datasets["captions"], datasets["instructions"]
    assert version.verify() == [] == chats.verify()
    assert chats.manifest["source"]["path"].endswith("conversations.jsonl") and chats.manifest["rows"]["kept"] > 0
    rows, made = version.manifest["rows"], json.loads((tmp_path / "home" / "sample" / "sample.json").read_text())
    assert made["spec"]["synthetic"] == 1000 and made["spec"]["defects"], "the quick corpus, its defects planted"
    assert rows["in"] == made["rows"] and rows["kept"] + sum(rows["rejected"].values()) == rows["in"]
    assert rows["kept"] > 0.9 * rows["in"]
    assert version.id in result.stdout and "near_duplicate" in result.stdout
    assert set(version.manifest["splits"]) == {"train", "val", "test"}
    assert "registered models:/mmpipe-contrastive/1 (alias candidate)" in result.stdout
    assert "mmpipe-contrastive v1 promoted to champion: no 'champion' yet" in result.stdout
    assert "zeroshot-digits" in result.stdout and "compositional" in result.stdout
    assert "registered models:/mmpipe-fusion/1 (alias candidate)" in result.stdout
    assert "mmpipe-fusion v1 promoted to champion: no 'champion' yet" in result.stdout
    assert "vqa" in result.stdout and "captioning" in result.stdout
    assert "registered models:/mmpipe-image-tokenizer/1 (alias candidate)" in result.stdout
    assert "mmpipe-image-tokenizer v1 promoted to champion: no 'champion' yet" in result.stdout
    assert "registered models:/mmpipe-unified/1 (alias candidate)" in result.stdout
    assert "mmpipe-unified v1 promoted to champion: no 'champion' yet" in result.stdout
    assert "reconstruction" in result.stdout and "text-to-image" in result.stdout
    # One table across the stages on the suites they share: compositional for all three models.
    shared = result.stdout[result.stdout.index("side by side on the suites they share"):]
    assert re.search(r"compositional[ │]+accuracy[ │]+(\d\.\d{4}[ │]+){3}$", shared, re.M), shared
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("mmpipe-contrastive", "champion").version) == "1"
    contrastive = client.get_model_version_by_alias("mmpipe-contrastive", "champion")
    sheets = [a.path for a in client.list_artifacts(contrastive.run_id, "search")]  # what the new model finds
    assert sheets == ["search/00-a-red-circle-above-a-blue-square.png", "search/01-a-handwritten-digit-seven.png"]
    fusion = client.get_model_version_by_alias("mmpipe-fusion", "champion")
    assert fusion.tags["parent_model"] == "mmpipe-contrastive/1" and fusion.tags["dataset_id"] == chats.id
    unified = client.get_model_version_by_alias("mmpipe-unified", "champion")
    assert unified.tags["parent_model"] == "mmpipe-image-tokenizer/1"
    assert unified.tags["dataset_id"] == chats.id and json.loads(unified.tags["mixed_datasets"]) == {version.id: 0.5}
    # The demo ran as Prefect flow runs, recorded in the project home's Prefect database (what `mmpipe up` shows).
    with sqlite3.connect(tmp_path / "home" / "prefect" / "prefect.db") as db:
        runs = db.execute("select flow.name, flow_run.state_type from flow_run join flow on flow.id = "
                          "flow_run.flow_id").fetchall()
        tasks = {name.split("-")[0] for (name,) in db.execute("select name from task_run")}
        artifacts = {key for (key,) in db.execute("select key from artifact")}
    assert runs == [("retrain", "COMPLETED")]
    assert {"mmpipe-dataset", "mmpipe-training", "mmpipe-evaluation", "mmpipe-stages"} <= artifacts
    assert {"ingest", "train", "promote"} <= tasks


def _assert_console_is_mmpipe_own(console: str) -> None:
    """What the user sees: mmpipe's lines, bars and tables; the libraries' output is in the log file."""
    lines = console.splitlines()
    assert len(lines) <= CONSOLE_LINES, f"{len(lines)} console lines:\n{console}"
    assert "Traceback" not in console
    assert not [line for line in lines if re.search(r"Warning|WARNING", line)], console
    for bar in ("downloading", "filtering", "training", "evaluating"):
        assert re.search(rf"^{bar}\s.*━", console, re.M), f"no {bar} progress bar:\n{console}"
    assert re.search(r"^training\s.*20/20.* loss \d+\.\d+ +\d+ samples/s", console, re.M), console
    logs = re.search(r"logs: (\S+\.log)$", console, re.M)
    assert logs, console
    log = Path(logs.group(1)).read_text()
    # Nothing is lost: Ray, its training workers (rank 0's step lines) and Prefect wrote to the log.
    assert "RayTrainWorker" in log and "step 20/20" in log and "Finished in state Completed" in log
