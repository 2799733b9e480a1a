"""A full disk, for real: an mmpipe command whose output lies on a small tmpfs that is filled first.

`on_full_disk(...)` runs this file as a script under `unshare --user --map-root-user --mount` (no root
needed), which mounts a tmpfs of `size_mb` at `mount` (visible to that process tree only), fills it
to `leave_kb`, runs the command, lists what is left on the tmpfs, frees the space, runs the command
again, then the checks; it prints one JSON object with what happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def can_mount_tmpfs() -> str | None:
    """None when this machine lets an unprivileged user namespace mount a tmpfs, else why not."""
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"no mount namespace here: {probe.stderr.strip()[:200]}"


def on_full_disk(mount: Path, size_mb: int, leave_kb: int, command: list[str], checks: list[list[str]],
                 env: dict[str, str], timeout_s: float = 900) -> dict:
    mount.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"mount": str(mount), "leave_kb": leave_kb, "command": command, "checks": checks})
    script = f'mount -t tmpfs -o size={size_mb}m tmpfs "$1" && exec "$2" "$3" "$4"'
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                             str(mount), sys.executable, __file__, spec],
                            capture_output=True, text=True, timeout=timeout_s, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    return {"rc": done.returncode, "stdout": done.stdout[-6000:], "stderr": done.stderr[-6000:]}


def main(spec: dict) -> None:
    mount = Path(spec["mount"])
    ballast = mount / "ballast"
    stat = os.statvfs(mount)
    with open(ballast, "wb") as handle:  # tmpfs keeps written zeros: this takes the space
        handle.write(b"\0" * max(stat.f_bavail * stat.f_frsize - spec["leave_kb"] * 1024, 0))
    full = _run(spec["command"])
    left = sorted(str(p.relative_to(mount)) for p in mount.rglob("*") if p != ballast)
    ballast.unlink()
    again = _run(spec["command"])
    checks = [_run(check) for check in spec["checks"]]
    print(json.dumps({"full": full, "left": left, "again": again, "checks": checks}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
