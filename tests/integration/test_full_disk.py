"""A full disk during ingest and during checkpointing: a small tmpfs, filled, as the output.

Each test runs the real `mmpipe` command on a disk with too little room left, looks at what it left
there, frees the space and runs the same command again (tests/integration/full_disk.py).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from mmcore.data.synthetic.corpus import SampleSpec, make_sample
from tests.integration.full_disk import can_mount_tmpfs, on_full_disk

pytestmark = [pytest.mark.integration, pytest.mark.fault]
CLI = str(Path(sys.executable).with_name("mmpipe"))


@pytest.fixture(scope="module", autouse=True)
def _mount_namespace():
    reason = can_mount_tmpfs()
    if reason:
        pytest.skip(reason)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    return {**env, "MMPIPE_HOME": str(home), "COLUMNS": "160"}


def _error_line(run: dict) -> str:
    lines = [line for line in (run["stdout"] + run["stderr"]).splitlines() if line.startswith("mmpipe: error:")]
    assert len(lines) == 1, run["stdout"] + run["stderr"]
    return lines[0]


def test_ingest_onto_a_full_disk_names_the_path_shows_no_dataset_and_completes_after(served_dir, tmp_path, fault):
    server, root = served_dir
    url_list = make_sample(root / "full-disk", f"{server.url}/full-disk",
                           SampleSpec(synthetic=300, digits=0, photos=False, defects=False, seed=11))
    disk = tmp_path / "disk"
    out = disk / "datasets" / "v1"
    ingest = [CLI, "ingest", str(url_list), "--out", str(out), "--allow-network", "127.0.0.1/32"]
    happened = on_full_disk(disk, size_mb=16, leave_kb=200, command=ingest,
                            checks=[[CLI, "dataset", "verify", str(out)]], env=_env(tmp_path / "home"))

    error = _error_line(happened["full"])
    assert happened["full"]["rc"] != 0
    assert "No space left on device" in error and str(disk) in error, error
    assert not [p for p in happened["left"] if p == "datasets/v1" or p.startswith(("datasets/v1/", "datasets/.v1"))], \
        f"a half-written dataset version is visible: {happened['left']}"
    assert happened["again"]["rc"] == 0, happened["again"]["stdout"] + happened["again"]["stderr"]
    assert happened["checks"][0]["rc"] == 0, happened["checks"][0]
    fault("disk-full", "ingest of 300 rows onto a 16 MB tmpfs filled to 200 KB free (output and work dir on it)",
          1, f"nothing: `{error.replace(str(disk), '<tmpfs>')}`; no dataset version visible; after freeing "
             "the space the same command completed and the version verifies")


@pytest.mark.long  # two training runs, each starting its own Ray inside the mount namespace: 100 s
def test_checkpoint_onto_a_full_disk_names_the_path_and_the_rerun_finishes(train_dataset, tmp_path, fault):
    disk = tmp_path / "disk"
    runs = disk / "runs"
    train = [CLI, "train", "contrastive", "--recipe", "debug", "--dataset", str(train_dataset.path),
             "--set", "optim.max_steps=6", "--set", "checkpoint.every_steps=3", "--set", "parallel.num_workers=1",
             "--set", "checkpoint.max_failures=0", "--set", f'cluster.storage_path="{runs}"']
    happened = on_full_disk(disk, size_mb=16, leave_kb=256, command=train, checks=[], env=_env(tmp_path / "home"))

    error = _error_line(happened["full"])
    assert "No space left on device" in error and str(runs) in error, error
    staged = [p for p in happened["left"] if re.search(r"\.staging|\.tmp", p)]
    assert staged == [], f"half-written checkpoint files are left: {staged}"
    again = happened["again"]
    assert again["rc"] == 0, again["stdout"] + again["stderr"]
    fault("disk-full", "training (debug recipe, 1 worker) with checkpoints onto a 16 MB tmpfs filled to 256 KB free",
          1, f"nothing: `{error.replace(str(disk), '<tmpfs>')}`; no staging files left; after freeing the space "
             "the same command finished the run")
