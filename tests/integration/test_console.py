"""A failed command, as a user runs it: one clear message naming what failed, and a log file with the details."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _mmpipe(home: Path, *args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("mmpipe")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(MMPIPE_HOME=str(home), COLUMNS="120")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=600, env=env)


def _one_failure(result: subprocess.CompletedProcess, home: Path, *expected: str) -> str:
    """Asserts one error line that names `expected` and a log file under `home`; returns the log's text."""
    console = result.stdout + result.stderr
    errors = [line for line in console.splitlines() if line.startswith("mmpipe: error:")]
    assert len(errors) == 1, console
    for text in expected:
        assert text in errors[0], console
    assert "Traceback" not in console
    details = re.search(r"^  details: (\S+\.log)$", result.stderr, re.M)
    assert details, console
    log = Path(details.group(1))
    assert log.is_file() and log.parent == home / "logs"
    return log.read_text()


def test_a_missing_dataset_is_one_message_and_a_log(tmp_path):
    missing = tmp_path / "no-such-dataset"
    home = tmp_path / "home"
    result = _mmpipe(home, "train", "contrastive", "--recipe", "debug", "--dataset", str(missing))
    assert result.returncode == 2
    log = _one_failure(result, home, "train failed", str(missing))
    assert "Traceback" in log and "DatasetError" in log
    assert len((result.stdout + result.stderr).splitlines()) == 2  # the message and where the details are


def test_a_training_worker_that_raises_is_one_message_and_a_log(train_dataset, tmp_path):
    """An absurd learning rate makes every rank's loss NaN: the workers raise NonFiniteLoss."""
    home = tmp_path / "home"
    result = _mmpipe(home, "train", "contrastive", "--recipe", "debug",
                     "--dataset", str(train_dataset.path), "--set", "optim.lr=1e30",
                     "--set", "checkpoint.max_failures=0")
    assert result.returncode == 1
    log = _one_failure(result, home, "train failed", "training worker rank 0", "NonFiniteLoss", "NaN or infinite")
    assert "WorkerGroupError" in log and "mmcore/train/loop.py" in log  # the worker's own traceback
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 4, lines  # training started (with its run directory), the bar, the error, the log
    assert (home / "runs").is_dir() and not list((home / "runs").glob("*/final"))  # no model was made
