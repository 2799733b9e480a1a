"""Verifiable checkpoints: a checkpoint counts when its manifest (every file's sha256) is there and verifies.

Layout: <run dir>/checkpoints/step-00000050/{manifest.json, state/..., ...}. Resume picks the newest
checkpoint that verifies; anything else is never loaded. These checkpoints are the only record of a run's
progress: none is reported to Ray Train (see fit.py), and retention (`prune`) is theirs alone.
  - On a disk (a shared mount across nodes): every rank writes into one hidden staging dir, rank 0
    writes the manifest and renames the dir into place (`seal`).
  - In a bucket (no rename, no shared directory): every rank saves into a node-local dir and uploads its
    own files under step-N/; rank 0 writes the manifest, listing all of them, last (`commit`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmcore import storage
from mmcore.pause import pause_point

MANIFEST = "manifest.json"
PREFIX = "step-"


def staging_dir(root: Path, step: int) -> Path:
    return root / f".{PREFIX}{step:08d}.tmp"


def step_dir(root, step: int):
    return root / f"{PREFIX}{step:08d}"


def seal(root: Path, step: int, meta: dict) -> Path:
    """Rank 0, after every rank has written into staging_dir: manifest, then atomic rename."""
    staging = staging_dir(root, step)
    files = {str(p.relative_to(staging)): storage.sha256(p) for p in sorted(staging.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (staging / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
    pause_point("checkpoint-sealing", step)
    final = step_dir(root, step)
    storage.publish(staging, final)  # the same step may be written again after a restart
    return final


def commit(root, step: int, files: dict[str, str], meta: dict):
    """Rank 0, after every rank has uploaded its files under step_dir (in a bucket): the manifest, last."""
    final = step_dir(root, step)
    pause_point("checkpoint-sealing", step)
    (final / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
    return final


def problem(path) -> str | None:
    """None when the manifest exists and every file it lists has its sha256, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            if not (path / name).exists():
                return f"{name} is missing"
            if storage.sha256(path / name) != digest:
                return f"{name} differs from its manifest"
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    return None


def verify(path) -> bool:
    return problem(path) is None


class Unresumable(RuntimeError):
    """A run directory holds checkpoints that were written whole (they have a manifest), and none verifies."""


def unresumable(root, problems: dict[str, str]) -> Unresumable:
    """Said instead of training from step 0, which would prune checkpoints that may be worth a look."""
    found = "; ".join(f"{name}: {why}" for name, why in problems.items())
    return Unresumable(f"{root.parent} cannot be resumed: none of its {len(problems)} checkpoint(s) verifies "
                       f"({found}). To train this run from step 0, move {root} out of the way and run the "
                       f"same command again.")


def checkpoints(root) -> list:
    """Checkpoint dirs (sealed on a disk; committed or not in a bucket), newest first."""
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()), key=lambda p: p.name,
                  reverse=True)


def latest_verified(root):
    """The newest checkpoint whose manifest verifies; None when there is none to resume from.

    A directory without a manifest was never finished (a kill while a bucket upload ran, or while
    retention deleted it) and is passed over. One with a manifest that does not verify is skipped
    too, but when every such one fails, that is said (Unresumable) instead of starting over.
    """
    failed = {}
    for path in checkpoints(root):
        if not (path / MANIFEST).exists():
            continue
        why = problem(path)
        if why is None:
            return path
        failed[path.name] = why
    if failed:
        raise unresumable(root, failed)
    return None


def read_meta(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def prune(root, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints, and stale staging dirs."""
    for path in checkpoints(root)[keep:]:
        storage.remove_tree(path)
        pause_point("checkpoint-pruned")
    if isinstance(root, Path):
        for path in root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
