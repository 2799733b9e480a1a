"""Writes that fail leave nothing half-written behind, and a full disk says so and names the path.

Libraries report a full disk unevenly: Python's OSError carries errno 28, pyarrow's says "No space
left on device" in its message, others wrap it in their own error types, and img2dataset only prints
it. `named(path)` turns any failure on a disk with (almost) no room left into one `OSError(ENOSPC)`
naming the path; `staged(path)` also removes the staging directory it was writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

LOW_BYTES = 1 << 20  # below this much free space, a failed write is taken for a full disk


def is_full(err: BaseException | None, path: Path | None = None) -> bool:
    """Whether `err` (or an error it came from) is a full disk, or the disk under `path` has no room left."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    local = path if isinstance(path, Path) else None  # a bucket has no disk to fill
    existing = next((p for p in (local, *local.parents) if p.exists()), None) if local else None
    return existing is not None and shutil.disk_usage(existing).free < LOW_BYTES


def full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def named(path: Path):
    """Re-raise a failure on a full disk as `full(path)`."""
    try:
        yield
    except Exception as err:
        if is_full(err, path):
            raise full(path) from err
        raise


@contextlib.contextmanager
def staged(path: Path):
    """Writing the staging directory `path`: removed when the body fails; a full disk named."""
    try:
        with named(path):
            yield
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
