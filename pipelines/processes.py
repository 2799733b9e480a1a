"""The stack's process trees (psutil): spawn a server in its own session, wait for its health check,
record its descendants, find every process of the stack and stop them."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from pipelines.services import StackError, healthy, read_state, stack_dir

# Inherited by every process the stack starts (Ray workers included), so `down` finds a process
# even after it left the session and lost its parent.
MARKER_ENV = "MMPIPE_STACK_HOME"
STOP_GRACE_S = 45.0  # a server's own orderly stop; Ray's drain on SIGTERM is off (_ray_spec)
KILL_WAIT_S = 5.0
LOG_TAIL_LINES = 30


def find_process(pid: int | None, create_time: float | None = None) -> psutil.Process | None:
    """The process, if it still runs and is the one we started (pids are reused)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _session_members(sid: int) -> list[psutil.Process]:
    """Processes of the session the leader opened; Ray workers change their group but keep the session."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _marked(home: Path) -> list[psutil.Process]:
    """Processes carrying this home's marker in their environment (started by this stack)."""
    mark = str(stack_dir(home))
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER_ENV) == mark:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def stack_processes(home: Path, state: dict | None = None) -> list[psutil.Process]:
    """Every live process that belongs to the stack: leaders, their sessions, descendants, marked ones."""
    state = state if state is not None else (read_state(home) or {"services": {}})
    procs: dict[int, psutil.Process] = {}
    for entry in state["services"].values():
        leader = find_process(entry["pid"], entry.get("create_time"))
        if leader is not None:
            procs[leader.pid] = leader
            procs.update((p.pid, p) for p in _descendants(leader))
            procs.update((p.pid, p) for p in _session_members(entry["pid"]))
        for pid, created in entry.get("children", []):
            child = find_process(pid, created)
            if child is not None:
                procs[pid] = child
    procs.update((p.pid, p) for p in _marked(home))
    return list(procs.values())


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _signal_leader(entry: dict, sig: int) -> None:
    leader = find_process(entry["pid"], entry.get("create_time"))
    if leader is None:
        return
    try:
        if entry.get("stop") == "leader" and sig == signal.SIGTERM:
            leader.send_signal(sig)
        else:
            os.killpg(entry["pgid"], sig)
    except (OSError, psutil.Error):
        pass


def kill_processes(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def stop_services(home: Path, state: dict) -> list[str]:
    """Stop every service in `state`: SIGTERM, wait, then SIGKILL whatever is left; return names stopped."""
    services = state["services"]
    stopped = [name for name, entry in services.items()
               if find_process(entry["pid"], entry.get("create_time")) or _tracked_alive(entry)]
    procs = stack_processes(home, state)
    for entry in services.values():
        _signal_leader(entry, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for _ in range(3):  # late spawns (a worker started during shutdown) are caught by the next sweep
        alive = list({p.pid: p for p in alive + stack_processes(home, state)}.values())
        if not alive:
            break
        kill_processes(alive, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=KILL_WAIT_S)
    _reap(services)
    if alive:
        pids = ", ".join(str(p.pid) for p in alive)
        raise StackError(f"could not stop processes {pids}; kill them by hand")
    return stopped


def _tracked_alive(entry: dict) -> bool:
    return any(find_process(pid, created) for pid, created in entry.get("children", []))


# Popen objects of servers started by this process, so they are reaped (not left as zombies) on stop.
_SPAWNED: dict[int, subprocess.Popen] = {}


def _reap(services: dict) -> None:
    for entry in services.values():
        popen = _SPAWNED.pop(entry["pid"], None)
        if popen is not None:
            try:
                popen.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass


def spawn(home: Path, name: str, spec: dict) -> dict:
    """Start one server in its own session (so its whole tree can be found and stopped); log to a file."""
    log = stack_dir(home) / "logs" / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(spec["env"], **{MARKER_ENV: str(stack_dir(home))})
    with open(log, "a") as handle:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        handle.write(f"\n=== mmpipe up {stamp}: {shlex.join(spec['command'])}\n")
        handle.flush()
        popen = subprocess.Popen(spec["command"], stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=str(home), start_new_session=True)
    _SPAWNED[popen.pid] = popen
    entry = {k: v for k, v in spec.items() if k != "env"}
    entry.update(pid=popen.pid, pgid=popen.pid, log=str(log),
                 create_time=psutil.Process(popen.pid).create_time(), children=[])
    return entry


def _log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def wait_healthy(home: Path, services: dict, timeout_s: float) -> None:
    """Poll every health check until all answer; raise StackError on an exit or at the deadline."""
    deadline = time.monotonic() + timeout_s
    pending = set(services)
    while pending:
        for name in sorted(pending):
            entry = services[name]
            if healthy(home, entry):
                pending.discard(name)
            elif _SPAWNED.get(entry["pid"]) is not None and _SPAWNED[entry["pid"]].poll() is not None:
                code = _SPAWNED[entry["pid"]].returncode
                raise StackError(f"{name} exited with status {code} while starting; last lines of "
                                 f"{entry['log']}:\n{_log_tail(entry['log'])}")
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"last lines of {services[n]['log']}:\n{_log_tail(services[n]['log'])}"
                              for n in sorted(pending))
            raise StackError(f"{', '.join(sorted(pending))} did not become healthy within {timeout_s:g} s\n{tails}")
        if pending:
            time.sleep(0.5)


def record_children(services: dict) -> None:
    """Remember every descendant now, so `down` finds one even if it leaves the session and is orphaned."""
    for entry in services.values():
        leader = find_process(entry["pid"], entry["create_time"])
        if leader is None:
            continue
        kids = _descendants(leader) + _session_members(entry["pid"])
        entry["children"] = sorted({(p.pid, _create_time(p)) for p in kids if _create_time(p)})


def _create_time(proc: psutil.Process) -> float | None:
    try:
        return proc.create_time()
    except psutil.Error:
        return None
