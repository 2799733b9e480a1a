"""Atomic, verifiable checkpoints: write to a temp dir, hash every file into a manifest, rename.

Layout: <run dir>/checkpoints/step-00000050/{manifest.json, state/..., ...}. A directory
without a manifest that verifies is never loaded; resume picks the newest one that does.
All ranks write into the same temp dir (DeepSpeed's per-rank files), so the run dir must be on
storage every node sees (ClusterConfig.storage_path).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def staging_dir(root: Path, step: int) -> Path:
    return root / f".{PREFIX}{step:08d}.tmp"


def seal(root: Path, step: int, meta: dict) -> Path:
    """Rank 0, after every rank has written into staging_dir: manifest, then atomic rename."""
    staging = staging_dir(root, step)
    files = {str(p.relative_to(staging)): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
    final = root / f"{PREFIX}{step:08d}"
    if final.exists():  # the same step written again after a restart
        shutil.rmtree(final)
    staging.rename(final)
    return final


def verify(path: Path) -> bool:
    """True when the manifest exists and every file it lists has its sha256."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all(_sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def checkpoints(root: Path) -> list[Path]:
    """Sealed checkpoints, newest first."""
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()), reverse=True)


def latest_verified(root: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (corrupt ones are skipped)."""
    return next((path for path in checkpoints(root) if verify(path)), None)


def read_meta(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def prune(root: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints, and stale staging dirs."""
    for path in checkpoints(root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
