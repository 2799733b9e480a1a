"""Helpers for tests that run `mmpipe serve` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_served(process: subprocess.Popen) -> None:
    """Stop `mmpipe serve` (started with start_new_session=True): SIGTERM while the Prefect API is still
    up (serve pauses its deployments on exit), then SIGKILL to whatever is left of its process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
