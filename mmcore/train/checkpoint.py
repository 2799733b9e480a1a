"""Verifiable checkpoints: a checkpoint counts when its manifest (every file's sha256) is there and verifies.

Layout: <run dir>/checkpoints/step-00000050/{manifest.json, state/..., ...}. Resume picks the newest
checkpoint that verifies; anything else is never loaded.
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

MANIFEST = "manifest.json"
PREFIX = "step-"


def staging_dir(root: Path, step: int) -> Path:
    return root / f".{PREFIX}{step:08d}.tmp"


def step_dir(root, step: int):
    return root / f"{PREFIX}{step:08d}"


def seal(root: Path, step: int, meta: dict) -> Path:
    """Rank 0, after every rank has written into staging_dir: manifest, then atomic rename."""
    staging = staging_dir(root, step)
    files = {str(p.relative_to(staging)): storage.sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
    final = step_dir(root, step)
    storage.publish(staging, final)  # the same step may be written again after a restart
    return final


def commit(root, step: int, files: dict[str, str], meta: dict):
    """Rank 0, after every rank has uploaded its files under step_dir (in a bucket): the manifest, last."""
    final = step_dir(root, step)
    (final / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
    return final


def verify(path) -> bool:
    """True when the manifest exists and every file it lists has its sha256."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(storage.sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def checkpoints(root) -> list:
    """Checkpoint dirs (sealed on a disk; committed or not in a bucket), newest first."""
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()), key=lambda p: p.name,
                  reverse=True)


def latest_verified(root):
    """The newest checkpoint whose manifest verifies (corrupt ones are skipped)."""
    return next((path for path in checkpoints(root) if verify(path)), None)


def read_meta(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def prune(root, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints, and stale staging dirs."""
    for path in checkpoints(root)[keep:]:
        storage.remove_tree(path)
    if isinstance(root, Path):
        for path in root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
