"""Pause points for crash tests: the process that reaches the point named in $MMPIPE_PAUSE_AT waits there.

Whether a run survives a crash depends on the exact moment it dies, and the moments that matter (a
checkpoint half sealed, an old one just deleted, a model version registered without its alias) last
milliseconds: a test cannot hit them by timing. With MMPIPE_PAUSE_AT="name" (or "name:step") set, a
process that reaches that point writes its pid to $MMPIPE_PAUSE_FILE and sleeps until it is killed;
the test then kills the whole process tree, as a node crash would. Unset, a pause point costs one
environment lookup. The points: train-step:N (after the backward pass of step N, before the optimizer
step), checkpoint-sealing:N (step N's files written, not yet visible), checkpoint-pruned (an old
checkpoint just deleted), model-registered (a model version made, no alias yet).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str, step: int | None = None) -> None:
    wanted = os.environ.get("MMPIPE_PAUSE_AT")
    if not wanted or wanted not in (name, f"{name}:{step}"):
        return
    if os.environ.get("MMPIPE_PAUSE_FILE"):
        Path(os.environ["MMPIPE_PAUSE_FILE"]).write_text(f"{os.getpid()} {wanted}\n")
    while True:
        time.sleep(60)
