"""Killing a training worker mid-run, for the resume tests of every stage."""

from __future__ import annotations

import os


def fit_killing_a_worker(cfg, home, checkpoint_glob: str):
    """fit(cfg) in a thread; once a checkpoint matching `checkpoint_glob` (under <home>/runs) is sealed,
    SIGKILL one Ray Train worker; returns the TrainResult of the resumed run."""
    import signal
    import threading
    import time
    from pathlib import Path

    import psutil

    from mmcore.train.fit import fit

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=fit(cfg)), daemon=True)
    thread.start()
    runs = Path(home) / "runs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(runs.glob(checkpoint_glob)):
        time.sleep(0.5)
    pids = [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
    assert pids, "training workers should be running"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    return outcome["result"]
