"""Verifiable checkpoints of a training run, on a disk or in a bucket, behind one interface (CheckpointStore).

A checkpoint counts when its manifest (every file's sha256) is there and verifies. Layout:
<run dir>/checkpoints/step-00000050/{manifest.json, state/...}. Resume picks the newest checkpoint that
verifies; anything else is never loaded. These checkpoints are the only record of a run's progress: none
is reported to Ray Train (see fit.py), and retention (`prune`) is theirs alone.
  - DiskStore (a local disk, or a mount every node shares): every rank writes into one hidden staging
    dir; rank 0 writes the manifest into it and renames it into place.
  - BucketStore (object storage: no rename, no shared directory): every rank saves into a dir on its own
    node's disk and uploads its files under step-N/; rank 0 writes the manifest, listing all of them,
    last. On resume every rank downloads a candidate and checks its own copy, so what a rank loads is
    what it verified, and a candidate counts only when it verified on every rank.
The ranks agree through a `Ranks` (mmcore/train/ranks.py): torch.distributed, or one process.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmcore import storage
from mmcore.disk import staged
from mmcore.pause import pause_point
from mmcore.train.ranks import Ranks

MANIFEST = "manifest.json"
PREFIX = "step-"


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


def read_meta(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


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
    """The newest checkpoint whose manifest verifies, read in place; None when there is none to resume from.

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


@dataclass
class Restored:
    """A checkpoint a rank resumes from."""

    local: Path
    """This rank's directory to load (the checkpoint itself on a disk, this rank's verified copy from a bucket)."""
    where: object
    """The checkpoint in the store."""
    meta: dict
    """Its manifest: step, files, and what the trainer put in (`state`, `metrics`)."""


class CheckpointStore:
    """A run's checkpoints: `save` and `restored` are called by every rank together, `checkpoints` by anyone."""

    def __init__(self, root, scratch: Path):
        self.root = root
        self.scratch = scratch
        """This node's disk, for what a rank must hold locally (a bucket's downloads and uploads)."""

    @staticmethod
    def of(run_dir) -> "CheckpointStore":
        """The store of a run directory: on a disk, or in a bucket (run_dir a path over s3fs, see storage.py)."""
        root = run_dir / "checkpoints"
        if isinstance(run_dir, Path):
            return DiskStore(root, run_dir)
        return BucketStore(root, storage.scratch_dir(run_dir))

    def step_dir(self, step: int):
        return self.root / f"{PREFIX}{step:08d}"

    def checkpoints(self) -> list:
        return checkpoints(self.root)

    def save(self, step: int, meta: dict, write: Callable[[Path], None], ranks: Ranks, keep: int):
        """Every rank: `write(local dir)` writes its part; the checkpoint becomes visible whole, then rank 0
        drops all but the newest `keep`. Returns the checkpoint on rank 0, None on the others."""
        final = self._write(step, meta, write, ranks)
        if ranks.rank == 0:
            self.prune(keep)
        ranks.barrier()  # no rank trains on before the checkpoint is whole
        return final

    def prune(self, keep: int) -> None:
        for path in self.checkpoints()[keep:]:
            storage.remove_tree(path)
            pause_point("checkpoint-pruned")

    def _write(self, step: int, meta: dict, write: Callable[[Path], None], ranks: Ranks):
        raise NotImplementedError

    def restored(self, ranks: Ranks) -> contextlib.AbstractContextManager[Restored | None]:
        """Every rank: the newest checkpoint that verifies, or None; raises Unresumable when checkpoints
        were written whole but none verifies."""
        raise NotImplementedError


class DiskStore(CheckpointStore):
    def _staging(self, step: int) -> Path:
        return self.root / f".{PREFIX}{step:08d}.tmp"

    def _write(self, step, meta, write, ranks):
        staging = self._staging(step)
        if ranks.rank == 0:  # one left by a killed run may hold its manifest
            shutil.rmtree(staging, ignore_errors=True)
        ranks.barrier()
        with staged(staging):
            write(staging)
        ranks.barrier()
        if ranks.rank != 0:
            return None
        with staged(staging):
            files = {str(p.relative_to(staging)): storage.sha256(p) for p in sorted(staging.rglob("*"))
                     if p.is_file() and p.name != MANIFEST}
            (staging / MANIFEST).write_text(json.dumps({"step": step, "files": files, **meta}, indent=2))
            pause_point("checkpoint-sealing", step)
            final = self.step_dir(step)
            storage.publish(staging, final)  # the same step may be written again after a restart
        return final

    def prune(self, keep: int) -> None:
        """All but the newest `keep` checkpoints, and staging dirs a crash left."""
        super().prune(keep)
        for path in self.root.glob(f".{PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def restored(self, ranks: Ranks) -> Iterator[Restored | None]:
        choice = None
        if ranks.rank == 0:  # rank 0 verifies, every rank loads the same one
            try:
                choice = str(latest_verified(self.root) or "")
            except Unresumable as err:
                choice = err
        choice = ranks.broadcast(choice)
        if isinstance(choice, Unresumable):
            raise choice
        yield Restored(Path(choice), Path(choice), read_meta(Path(choice))) if choice else None


class BucketStore(CheckpointStore):
    def _write(self, step, meta, write, ranks):
        final = self.step_dir(step)
        if ranks.rank == 0:  # a step written again first loses its old manifest
            storage.remove_tree(final)
        ranks.barrier()
        local = self.scratch / f".{final.name}.rank-{ranks.rank}.tmp"
        shutil.rmtree(local, ignore_errors=True)  # left by a killed run: only this save's files are uploaded
        with staged(local):
            write(local)
            files = storage.upload_tree(local, final)
        shutil.rmtree(local)
        every = ranks.all_gather(files)
        if ranks.rank != 0:
            return None
        pause_point("checkpoint-sealing", step)
        listed = {name: digest for part in every for name, digest in part.items()}
        (final / MANIFEST).write_text(json.dumps({"step": step, "files": listed, **meta}, indent=2))
        return final

    @contextlib.contextmanager
    def restored(self, ranks: Ranks) -> Iterator[Restored | None]:
        names = ranks.broadcast([p.name for p in self.checkpoints()] if ranks.rank == 0 else None)
        local = self.scratch / f".resume-rank-{ranks.rank}"
        failed, found = {}, None
        for name in names:  # every rank tries the same candidates, in the same order
            remote = self.root / name
            if not ranks.all_true((remote / MANIFEST).exists()):
                continue  # never committed: passed over, as on a disk
            why = problem(storage.download_tree(remote, local))
            if ranks.all_true(why is None):
                found = Restored(local, remote, read_meta(local))
                break
            failed[name] = why or "differs from its manifest on another rank"
        if found is None and failed:
            shutil.rmtree(local, ignore_errors=True)
            raise unresumable(self.root, failed)
        try:
            yield found
        finally:
            shutil.rmtree(local, ignore_errors=True)
