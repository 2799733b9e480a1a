"""Killing training workers mid-run, or `mmpipe` with all it started, for the resume and fault tests; the
overrides that train in the test's own process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path


HERE = ["cluster.executor=\"here\"", "parallel.num_workers=1"]
"""Overrides that train in the test's own process, one rank, no Ray (the same Trainer, registered alike):
for the fixtures whose point is the stage's logic. Ray Train and Ray Data stay where they are the point
(`trained`, the killed-worker, cluster and whole-tree tests)."""


def fit_killing_a_worker(cfg, runs, checkpoint_glob: str):
    """fit(cfg) in a thread; once a checkpoint matching `checkpoint_glob` under `runs` (a directory, or a
    prefix in a bucket) is there, SIGKILL one Ray Train worker; returns the TrainResult of the resumed
    run and the last step the run had reported (progress.json) when the worker was killed."""
    import signal
    import threading
    import time

    from mmcore.train.fit import fit

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(runs.glob(checkpoint_glob)):
        time.sleep(0.5)
    pids = train_workers()
    assert pids, "training workers should be running"
    os.kill(max(pids), signal.SIGKILL)
    found = list(runs.glob(checkpoint_glob))[0]
    run_dir = next(p for p in found.parents if p.name == "checkpoints").parent
    killed_at = json.loads((run_dir / "progress.json").read_text())["step"]
    thread.join(timeout=600)
    return outcome["result"], killed_at


def train_workers() -> set[int]:
    """The Ray Train workers this process started (through its local Ray, or the Ray nodes it launched), not
    those of a test running beside it."""
    import psutil

    found = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("RayTrainWorker" in part for part in child.cmdline()):
                found.add(child.pid)
    return found


def fit_with_kills(cfg, run_dir, triggers, timeout_s: float = 900):
    """fit(cfg) in a thread; for each (label, when) in `triggers`, once `when(run_dir)` is true SIGKILL one Ray
    Train worker, then wait for the restarted worker group before watching for the next. Returns the
    TrainResult and, per kill, (label, the step the run had reported when it was killed)."""
    import signal
    import threading
    import time
    from pathlib import Path

    from mmcore.train.fit import fit

    run_dir, outcome, kills = Path(run_dir), {}, []
    thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    for label, when in triggers:
        while not when(run_dir) and thread.is_alive():
            assert time.monotonic() < deadline, f"{label}: not reached within {timeout_s} s"
            time.sleep(0.005)
        killed = train_workers()
        assert killed, f"{label}: training workers should be running"
        os.kill(max(killed), signal.SIGKILL)
        kills.append((label, reported_step(run_dir)))
        while not ((workers := train_workers()) and not workers & killed):  # the restarted group is up
            assert time.monotonic() < deadline
            time.sleep(0.2)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    return outcome["result"], kills


def reported_step(run_dir) -> int:
    from pathlib import Path

    try:
        return json.loads((Path(run_dir) / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def mmpipe_process(home: Path, *args: str, **env: str) -> subprocess.Popen:
    """`mmpipe ARGS` in a process of its own with MMPIPE_HOME=home (and `env`), its output in a pipe; none of
    this session's Prefect, MLflow, Ray or mmpipe settings reach it."""
    cli = Path(sys.executable).with_name("mmpipe")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS", "MMPIPE_"))}
    return subprocess.Popen([str(cli), *args], env={**base, "MMPIPE_HOME": str(home), **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(pid: int) -> int:
    """SIGKILL a process and every process under it, as a crash of their machine would: all are stopped
    first, so none sees another die (Ray restarts what it sees die), then all are killed. Returns how many."""
    import psutil

    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.suspend()
    tree += [proc for proc in root.children(recursive=True) if proc not in tree]  # started meanwhile
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"still alive after SIGKILL: {alive}"
    return len(tree)
