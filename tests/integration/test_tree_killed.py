"""The whole process tree of `mmpipe train` killed at exact moments, then the same command again.

SIGKILL reaches the driver, its local Ray (GCS, raylet, the Train controller) and both workers at once, as a
node crash, the OOM killer or a preempted machine does. The moments are pause points (mmcore/pause.py) at
seeded steps: mid-step, while a checkpoint is sealing, right after retention deleted an old checkpoint, and
during registration (a model version made, no alias yet). After each kill the same command runs again and
is killed at the next moment; the last run finishes. On a disk and with the runs in a bucket.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from mmcore import storage
from mmcore.cli import apply_overrides
from mmcore.models import model_config
from mmcore.recipes import recipe
from mmcore.train.plan import run_name
from tests.integration.workers import kill_tree, mmpipe_process

pytestmark = [pytest.mark.integration, pytest.mark.fault]

STEPS, EVERY = 40, 10  # checkpoints at steps 10, 20 and 30, two kept
SETTLE_S = 5  # the rest of the tree runs on meanwhile: Ray Train's controller polls its workers every 2 s
MODEL = "mmpipe-tree-killed"


def _killed_at(home: Path, command: list[str], point: str) -> int:
    """Run the command until a process of it reaches `point`, give the rest SETTLE_S, then kill the whole tree;
    returns the tree's size."""
    paused = home / "paused"
    paused.unlink(missing_ok=True)
    driver = mmpipe_process(home, *command, MMPIPE_PAUSE_AT=point, MMPIPE_PAUSE_FILE=str(paused))
    deadline = time.monotonic() + 300
    while not paused.exists():
        if driver.poll() is not None:
            pytest.fail(f"the command ended before it reached {point}:\n{driver.stdout.read()}")
        assert time.monotonic() < deadline, f"{point} not reached in 300 s"
        time.sleep(0.1)
    time.sleep(SETTLE_S)
    killed = kill_tree(driver.pid)
    driver.communicate()
    return killed


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_the_whole_tree_killed_at_seeded_moments_resumes_and_registers_once(where, train_dataset, trained,
                                                                            tmp_path, fault, request):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    sets = [f"optim.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "data.record_samples=true",
            f'tracking.model_name="{MODEL}"']
    if where == "bucket":
        sets.append(f'cluster.storage_path="{request.getfixturevalue("object_store").bucket()}/runs"')
    command = ["train", "contrastive", "--recipe", "debug", "--dataset", str(train_dataset.path),
               *(arg for item in sets for arg in ("--set", item))]
    cfg = apply_overrides(recipe("debug", str(train_dataset.path)), sets)  # as the command makes it
    name = run_name(cfg, train_dataset.id, model_config(cfg.model.name))
    run_dir = storage.path(cfg.cluster.storage_path or home / "runs") / name
    rng = random.Random(f"tree-killed-{where}")
    moments = [("mid-step", f"train-step:{rng.randint(EVERY + 1, 2 * EVERY - 1)}"),
               ("while a checkpoint is sealing", f"checkpoint-sealing:{rng.choice([2 * EVERY, 3 * EVERY])}"),
               ("right after retention deleted a checkpoint", "checkpoint-pruned"),
               ("during registration (a model version made, no alias yet)", "model-registered")]

    trees = []
    for label, point in moments:
        trees.append(_killed_at(home, command, point))
        if point.startswith("checkpoint-sealing"):  # what an earlier mmpipe left: Ray's run snapshot, cut short
            (run_dir / "checkpoint_manager_snapshot.json").write_text(
                '{"ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": "checkpoints/step-00000010"')
    last = mmpipe_process(home, *command)
    output = last.communicate(timeout=600)[0]

    assert last.returncode == 0, output
    assert f"run {name} finished training before: registering its model" in output, output
    result = json.loads((run_dir / "result.json").read_text())
    assert result["model_version"] == "1" and result["metrics"]["step"] == STEPS
    assert result["metrics"]["resumed_from"] == 3 * EVERY, "the run that finished started from the newest checkpoint"
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"], "registered once"
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == "1"
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"attributes.run_name = '{name}'")
    assert [r.info.status for r in runs] == ["FINISHED"], "one MLflow run, reopened by every command"

    # Exactly once: the rows behind the model are the first rows of the uninterrupted `trained` run (same
    # recipe, data and seed; 120 steps), in the same order, none repeated or skipped.
    samples = (run_dir if where == "disk" else home / "scratch" / name) / "samples"
    rows = 0
    for rank in range(2):
        reference = (Path(trained.run_dir) / "samples" / f"rank-{rank}.tsv").read_text().splitlines()
        ours = (samples / f"rank-{rank}.tsv").read_text().splitlines()
        assert ours == reference[:len(reference) * STEPS // trained.metrics["step"]]
        rows += len(ours)
    fault("tree-killed", f"SIGKILL to the whole process tree of `mmpipe train` ({min(trees)}-{max(trees)} processes: "
          f"driver, Ray, 2 workers; runs on a {where}), then the same command, 4 times in one run: "
          + "; ".join(f"{label} ({point})" for label, point in moments)
          + "; before the third, a cut-short Ray run snapshot naming a deleted checkpoint",
          len(moments), f"nothing: resumed each time from the newest checkpoint that verifies (the run that finished "
          f"training from step {result['metrics']['resumed_from']}), one model version and one MLflow run")
    fault("exactly-once", f"the same 4 kills of the whole tree (runs on a {where}); rows recorded per rank against "
          "the uninterrupted run's", 1, f"0 rows repeated or skipped: 2 ranks x {rows // 2} rows identical to the "
          "uninterrupted run's first rows")
