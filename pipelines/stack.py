"""The local stack: `mmpipe up` / `status` / `down` for a Prefect server, an MLflow server and a Ray head."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psutil

from mmcore import console, storage

DEFAULT_HOST = "127.0.0.1"
SERVICES = ("prefect", "mlflow", "ray")
# Every port `up` binds, with the service it belongs to (the name a port clash is reported under).
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "ray": 6379, "ray_dashboard": 8265, "ray_client": 10001}
PORT_OWNER = {"prefect": "prefect", "mlflow": "mlflow", "ray": "ray",
              "ray_dashboard": "ray dashboard", "ray_client": "ray client"}
# Inherited by every process the stack starts (Ray workers included), so `down` finds a process
# even after it left the session and lost its parent.
MARKER_ENV = "MMPIPE_STACK_HOME"
STOP_GRACE_S = 45.0  # a server's own orderly stop; Ray's drain on SIGTERM is off (_ray_spec)
KILL_WAIT_S = 5.0
LOG_TAIL_LINES = 30


class StackError(RuntimeError):
    """A user-facing failure of `up` / `down` (port taken, a server that would not start, ...)."""


# ---------------------------------------------------------------------------------------------
# Paths and state


def stack_dir(home: Path) -> Path:
    return Path(home).expanduser().resolve() / "stack"


def state_path(home: Path) -> Path:
    return stack_dir(home) / "state.json"


def env_path(home: Path) -> Path:
    return stack_dir(home) / "env"


def token_path(home: Path) -> Path:
    return stack_dir(home) / "ray_auth_token"


def credentials_path(home: Path) -> Path:
    """The user and password of the Prefect and MLflow servers of a stack started with auth (0600)."""
    return stack_dir(home) / "credentials.json"


LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_USER = "mmpipe"


def ray_temp_dir(home: Path) -> Path:
    """Ray's session directory, short on purpose: Ray's Unix socket paths live under it (107-byte limit).

    It is also not /tmp/ray, so a plain `ray.init()` elsewhere never attaches to this head by accident.
    """
    import hashlib

    digest = hashlib.sha1(str(stack_dir(home)).encode()).hexdigest()[:10]
    return Path("/tmp") / f"mmpipe-ray-{digest}"


def read_state(home: Path) -> dict | None:
    try:
        return json.loads(state_path(home).read_text())
    except FileNotFoundError:
        return None


def _write_state(home: Path, state: dict) -> None:
    path = state_path(home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)  # atomic: `down` never reads half a file


# ---------------------------------------------------------------------------------------------
# Ports and URLs


def _url_host(host: str) -> str:
    """The host to put in URLs: a wildcard bind is reached through loopback here."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # The servers set SO_REUSEADDR too: a port in TIME_WAIT is free for them, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_ports(host: str, ports: dict[str, int]) -> None:
    """Raise StackError naming the first port that is taken, before anything starts."""
    if len(set(ports.values())) != len(ports):
        raise StackError(f"two services were given the same port: {ports}")
    for key, port in ports.items():
        # Ray's GCS listens on every interface whatever the dashboard host is.
        bind_host = "0.0.0.0" if key == "ray" and ":" not in host else host
        if not port_free(bind_host, port):
            flag = "--" + key.replace("_", "-") + "-port"
            raise StackError(f"port {port} ({PORT_OWNER[key]}) is already in use on {host}; pass {flag}")


def _ray_client_available() -> bool:
    """Ray's client server (ray://) needs grpcio (ray[client] / ray[default]); without it there is none."""
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


def _resolve_ports(ports: dict[str, int] | None) -> dict[str, int]:
    resolved = dict(DEFAULT_PORTS)
    unknown = set(ports or {}) - set(resolved)
    if unknown:
        raise ValueError(f"unknown stack ports {sorted(unknown)}; known: {sorted(resolved)}")
    resolved.update(ports or {})
    if not _ray_client_available():
        resolved.pop("ray_client")
    return resolved


def urls_for(host: str, ports: dict[str, int]) -> dict[str, str]:
    h = _url_host(host)
    urls = {
        "prefect_ui": f"http://{h}:{ports['prefect']}",
        "prefect_api": f"http://{h}:{ports['prefect']}/api",
        "mlflow_ui": f"http://{h}:{ports['mlflow']}",
        "ray_dashboard": f"http://{h}:{ports['ray_dashboard']}",
        "ray_address": f"{h}:{ports['ray']}",
    }
    if "ray_client" in ports:
        urls["ray_client"] = f"ray://{h}:{ports['ray_client']}"
    return urls


def client_env(home: Path, urls: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a client needs to use the stack (written to <home>/stack/env, 0600): with auth,
    the credentials too.

    Without `urls`: the running stack's (from state.json), or {} when it is not fully running.
    """
    if urls is None:
        alive = running(home)
        if not alive or not all(alive.values()):
            return {}
        urls = read_state(home)["urls"]
    auth = {}
    if (read_state(home) or {}).get("auth"):
        user, password = _credentials(home)
        auth = {"PREFECT_API_AUTH_STRING": f"{user}:{password}", "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password}
    return {**auth,
        "PREFECT_API_URL": urls["prefect_api"],
        "MLFLOW_TRACKING_URI": urls["mlflow_ui"],
        "RAY_ADDRESS": urls["ray_address"],
        "RAY_API_SERVER_ADDRESS": urls["ray_dashboard"],  # `ray job submit`
        # Both are needed: with only a token path, ray.init(address=...) does not send the token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path(home)),
    }


# ---------------------------------------------------------------------------------------------
# Commands and health checks


def _executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"cannot find `{name}` next to {sys.executable}; is mmpipe installed in this environment?")
    return str(path)


def _write_private(path: Path, text: str) -> None:
    """A new file only its owner can read (a token, a password): created with that mode, so it is never
    readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _ray_token(home: Path) -> str:
    """Reuse the stack's token across restarts (clients keep working); make one the first time."""
    path = token_path(home)
    if not path.exists():
        _write_private(path, secrets.token_hex(32))  # what `ray get-auth-token --generate` makes: 256 bits
    return path.read_text().strip()


def _secrets(home: Path) -> dict[str, str]:
    """The stack's user, password and MLflow's CSRF key, reused across restarts (clients and sessions keep
    working); made the first time."""
    path = credentials_path(home)
    if not path.exists():
        _write_private(path, json.dumps({"user": AUTH_USER, "password": secrets.token_urlsafe(24),
                                         "mlflow_flask_secret_key": secrets.token_hex(32)}))
    return json.loads(path.read_text())


def _credentials(home: Path) -> tuple[str, str]:
    saved = _secrets(home)
    return saved["user"], saved["password"]


def _prefect_spec(home: Path, host: str, ports: dict[str, int], auth: bool = False) -> dict:
    spec = {
        "command": [_executable("prefect"), "server", "start", "--host", host, "--port", str(ports["prefect"])],
        # The UI calls the API at this address (by default :4200, whatever --port says).
        "env": {"PREFECT_HOME": str(Path(home) / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_UI_API_URL": f"http://{_url_host(host)}:{ports['prefect']}/api"},
        "health": f"http://{_url_host(host)}:{ports['prefect']}/api/health",
        "port": ports["prefect"],
        "stop": "group",
    }
    if auth:  # Prefect's basic auth: the API answers 401 without it, the UI asks for it
        spec["env"]["PREFECT_SERVER_API_AUTH_STRING"] = ":".join(_credentials(home))
        spec.update(authed=f"http://{_url_host(host)}:{ports['prefect']}/api/admin/version", auth="basic")
    return spec


def _mlflow_spec(home: Path, host: str, ports: dict[str, int], auth: bool = False, artifacts: str = "") -> dict:
    home = Path(home)
    spec = {
        # --artifacts-destination (proxied artifacts): runs logged through this server land in
        # <artifacts or home/mlartifacts>/<experiment id>, clients never hold the bucket's keys (the server
        # reads them from the AWS variables); runs the library logs straight to sqlite keep their
        # file://<home>/mlartifacts/<name> location, which the server reads as it is. One worker: 2 cores.
        "command": [_executable("mlflow"), "server", "--host", host, "--port", str(ports["mlflow"]),
                    "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                    "--artifacts-destination", artifacts or str(home / "mlartifacts"), "--workers", "1"],
        # The job runner (GenAI scorers) starts ~7 huey consumers; nothing here uses it.
        "env": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        "health": f"http://{_url_host(host)}:{ports['mlflow']}/health",
        "port": ports["mlflow"],
        "stop": "group",
    }
    if auth:  # MLflow's basic-auth app: its own user store; without credentials nothing can be read
        user, password = _credentials(home)
        config = stack_dir(home) / "mlflow-auth.ini"
        config.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                          f"database_uri = sqlite:///{stack_dir(home) / 'mlflow-auth.db'}\n"
                          f"admin_username = {user}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        spec["command"] += ["--app-name", "basic-auth"]
        spec["env"].update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                           MLFLOW_FLASK_SERVER_SECRET_KEY=_secrets(home)["mlflow_flask_secret_key"])
        spec.update(authed=f"http://{_url_host(host)}:{ports['mlflow']}/api/2.0/mlflow/experiments/search"
                           "?max_results=1", auth="basic")
    return spec


def _specs(home: Path, host: str, ports: dict[str, int], auth: bool, artifacts: str = "") -> dict[str, dict]:
    """How to start each server of the stack (`up` starts all, a restart the stopped ones)."""
    return {"prefect": _prefect_spec(home, host, ports, auth),
            "mlflow": _mlflow_spec(home, host, ports, auth, artifacts), "ray": _ray_spec(home, host, ports)}


def _ray_spec(home: Path, host: str, ports: dict[str, int]) -> dict:
    command = [_executable("ray"), "start", "--head", "--block", "--port", str(ports["ray"]),
               "--dashboard-host", host, "--dashboard-port", str(ports["ray_dashboard"]),
               "--include-dashboard", "true", "--temp-dir", str(ray_temp_dir(home)),
               # 0 = any free port: the default 52365 clashes with any other Ray on this machine.
               "--dashboard-agent-listen-port", "0",
               # Logical CPUs as for a local Ray (STACK_NOTES): data tasks beside the training workers.
               "--num-cpus", str(max(4, os.cpu_count() or 1)),
               "--disable-usage-stats", "--log-style", "record", "--log-color", "false"]
    if host not in ("0.0.0.0", "::", ""):
        command += ["--node-ip-address", host]
    if "ray_client" in ports:
        command += ["--ray-client-server-port", str(ports["ray_client"])]
    return {
        "command": command,
        # Token auth, explicitly: `ray start --head` enables it only when it finds a token.
        # No drain on SIGTERM: Ray 2.60 waits up to 30 s for every worker lease to come back (for Ray
        # Serve's replicas, which the stack has none of), so `mmpipe down` after a training run took 30 s.
        "env": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path(home)),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        "health": f"http://{_url_host(host)}:{ports['ray_dashboard']}/api/gcs_healthz",
        "authed": f"http://{_url_host(host)}:{ports['ray_dashboard']}/api/version", "auth": "bearer",
        "port": ports["ray"],
        # SIGTERM to `ray start --block` alone: it stops its node's processes in order.
        # SIGTERM to the whole group at once leaves it waiting ~45 s for a GCS that already quit.
        "stop": "leader",
    }


def _get(url: str, headers: dict | None = None, timeout: float = 2.0) -> int:
    """HTTP status of a GET (0 when nothing answers); proxies from the environment are not used."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0


def auth_headers(home: Path, kind: str) -> dict[str, str]:
    """What a client sends: Ray's token (bearer), or the stack's user and password (basic)."""
    if kind == "bearer":
        return {"Authorization": f"Bearer {token_path(home).read_text().strip()}"}
    return {"Authorization": "Basic " + base64.b64encode(":".join(_credentials(home)).encode()).decode()}


def healthy(home: Path, entry: dict) -> bool:
    if _get(entry["health"]) != 200:
        return False
    if "authed" in entry:  # the credentials the clients are given must be the ones the server accepts
        return _get(entry["authed"], auth_headers(home, entry["auth"])) == 200
    return True


# ---------------------------------------------------------------------------------------------
# Processes


def _alive(pid: int | None, create_time: float | None = None) -> psutil.Process | None:
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
        leader = _alive(entry["pid"], entry.get("create_time"))
        if leader is not None:
            procs[leader.pid] = leader
            procs.update((p.pid, p) for p in _descendants(leader))
            procs.update((p.pid, p) for p in _session_members(entry["pid"]))
        for pid, created in entry.get("children", []):
            child = _alive(pid, created)
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
    leader = _alive(entry["pid"], entry.get("create_time"))
    if leader is None:
        return
    try:
        if entry.get("stop") == "leader" and sig == signal.SIGTERM:
            leader.send_signal(sig)
        else:
            os.killpg(entry["pgid"], sig)
    except (OSError, psutil.Error):
        pass


def _kill(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _stop(home: Path, state: dict) -> list[str]:
    """Stop every service in `state`: SIGTERM, wait, then SIGKILL whatever is left; return names stopped."""
    services = state["services"]
    stopped = [name for name, entry in services.items()
               if _alive(entry["pid"], entry.get("create_time")) or _tracked_alive(entry)]
    procs = stack_processes(home, state)
    for entry in services.values():
        _signal_leader(entry, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for _ in range(3):  # late spawns (a worker started during shutdown) are caught by the next sweep
        alive = list({p.pid: p for p in alive + stack_processes(home, state)}.values())
        if not alive:
            break
        _kill(alive, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=KILL_WAIT_S)
    _reap(services)
    if alive:
        pids = ", ".join(str(p.pid) for p in alive)
        raise StackError(f"could not stop processes {pids}; kill them by hand")
    return stopped


def _tracked_alive(entry: dict) -> bool:
    return any(_alive(pid, created) for pid, created in entry.get("children", []))


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


def _spawn(home: Path, name: str, spec: dict) -> dict:
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


def _wait_healthy(home: Path, services: dict, timeout_s: float) -> None:
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


def _record_children(services: dict) -> None:
    """Remember every descendant now, so `down` finds one even if it leaves the session and is orphaned."""
    for entry in services.values():
        leader = _alive(entry["pid"], entry["create_time"])
        if leader is None:
            continue
        kids = _descendants(leader) + _session_members(entry["pid"])
        entry["children"] = sorted({(p.pid, _create_time(p)) for p in kids if _create_time(p)})


def _create_time(proc: psutil.Process) -> float | None:
    try:
        return proc.create_time()
    except psutil.Error:
        return None


# ---------------------------------------------------------------------------------------------
# Public API


def running(home: Path) -> dict[str, bool]:
    """Which recorded services still have their process (empty when nothing is recorded)."""
    state = read_state(home)
    if state is None:
        return {}
    return {name: _alive(e["pid"], e.get("create_time")) is not None for name, e in state["services"].items()}


def up(home: Path, host: str = DEFAULT_HOST, ports: dict[str, int] | None = None,
       timeout_s: float = 120, auth: bool = False, artifacts: str = "") -> dict[str, str]:
    """Start Prefect, MLflow and a Ray head on `host`, wait until each is healthy; return their URLs.

    Already up: returns the recorded URLs and starts nothing; partly up: starts again only the servers
    whose process is gone, on their recorded host and ports. A port already taken raises StackError
    before anything starts; a server that fails to start or to become healthy stops all of them.
    Off loopback, `auth` is required: basic auth on Prefect and MLflow (Ray always uses its token).
    `artifacts`: where MLflow's server keeps model artifacts (s3://bucket/prefix; default <home>/mlartifacts).
    """
    home = Path(home).expanduser().resolve()
    alive = running(home)
    if alive and all(alive.values()):
        return read_state(home)["urls"]
    if any(alive.values()):
        return _restart(home, [name for name, ok in alive.items() if not ok], timeout_s)
    if host not in LOOPBACK and not auth:
        raise StackError(f"refusing to serve Prefect and MLflow on {host} without authentication: add --auth "
                         f"(basic auth on both, with a password generated into {credentials_path(home)} and "
                         f"handed to clients in {env_path(home)}; Ray already requires its token)")
    resolved = _resolve_ports(ports)
    _check_ports(host, resolved)
    _check_ray_dashboard_deps()
    if artifacts:
        location = storage.path(artifacts)  # a local path or s3://: anything else is refused here
        storage.check(artifacts)
        if isinstance(location, Path):  # relative to where `mmpipe up` was typed, not the server's directory
            artifacts = str(location.expanduser().absolute())
    (stack_dir(home) / "logs").mkdir(parents=True, exist_ok=True)
    _ray_token(home)
    specs = _specs(home, host, resolved, auth, artifacts)
    urls = urls_for(host, resolved)
    state = {"host": host, "ports": resolved, "urls": urls, "auth": auth, "artifacts": artifacts, "services": {}}
    try:
        for name, spec in specs.items():
            state["services"][name] = _spawn(home, name, spec)
            _write_state(home, state)  # written as each starts: an interrupted `up` can still be stopped
        _wait_healthy(home, state["services"], timeout_s)
        _record_children(state["services"])
        _write_state(home, state)
        _link_ray_logs(home)
    except BaseException:  # KeyboardInterrupt included: never leave half a stack behind
        _stop(home, state)
        state_path(home).unlink(missing_ok=True)
        raise
    _write_env(home, urls)
    return urls


def _restart(home: Path, names: list[str], timeout_s: float) -> dict[str, str]:
    """Start again the services of a running stack whose process is gone (crashed, killed), on the
    host and ports the stack was started with; the others keep running."""
    state = read_state(home)
    specs = _specs(home, state["host"], state["ports"], state.get("auth", False), state.get("artifacts", ""))
    restarted = {}
    for name in names:
        entry = state["services"][name]
        _kill([p for pid, created in entry.get("children", []) if (p := _alive(pid, created))], signal.SIGKILL)
        if not port_free(state["host"], entry["port"]):
            raise StackError(f"{name} stopped but port {entry['port']} is still taken; run `mmpipe down`, then `mmpipe up`")
        restarted[name] = state["services"][name] = _spawn(home, name, specs[name])
        _write_state(home, state)
    _wait_healthy(home, restarted, timeout_s)  # on failure the stack stays partly up, as it was: `mmpipe down`
    _record_children(restarted)
    _write_state(home, state)
    return state["urls"]


def _link_ray_logs(home: Path) -> None:
    """Make Ray's own logs (under its short temp dir) reachable from <home>/stack/logs/ray-session."""
    link = stack_dir(home) / "logs" / "ray-session"
    if not link.is_symlink():
        link.symlink_to(ray_temp_dir(home) / "session_latest" / "logs")


def _check_ray_dashboard_deps() -> None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what `ray start --include-dashboard` needs
    except ImportError as err:
        raise StackError(f"the Ray dashboard needs ray[default] ({err}); "
                         "install 'ray[default]' at the same version as ray") from None


def _write_env(home: Path, urls: dict[str, str]) -> None:
    lines = ["# mmpipe local stack, written by `mmpipe up`: `source` this file to use it"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env(home, urls).items()]
    env_path(home).unlink(missing_ok=True)
    _write_private(env_path(home), "\n".join(lines) + "\n")  # it may hold the password


def status(home: Path) -> list[dict]:
    """One row per service: service, running, pid, url, healthy (checked now)."""
    home = Path(home).expanduser().resolve()
    state = read_state(home) or {"services": {}, "urls": {}}
    rows = []
    for name in SERVICES:
        entry = state["services"].get(name)
        proc = _alive(entry["pid"], entry.get("create_time")) if entry else None
        rows.append({"service": name, "running": proc is not None, "pid": proc.pid if proc else None,
                     "url": _service_url(name, state["urls"]),
                     "healthy": bool(proc is not None and healthy(home, entry))})
    return rows


def _service_url(name: str, urls: dict[str, str]) -> str:
    key = {"prefect": "prefect_ui", "mlflow": "mlflow_ui", "ray": "ray_dashboard"}[name]
    return urls.get(key, "")


def down(home: Path) -> list[str]:
    """Stop everything the stack started (recorded or marked), remove state.json; return names stopped."""
    home = Path(home).expanduser().resolve()
    state = read_state(home) or {"services": {}}
    stopped = _stop(home, state)
    state_path(home).unlink(missing_ok=True)
    env_path(home).unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------------------------------------
# Command line


def _default_home() -> str:
    return os.environ.get("MMPIPE_HOME", "~/.mmpipe")


def add_stack_commands(subparsers) -> None:
    """Add `up`, `status` and `down` to an argparse subparsers object; each sets func(args) -> int."""
    start = subparsers.add_parser("up", help="start Prefect, MLflow and a Ray head on this machine")
    _add_home(start)
    start.add_argument("--host", default=DEFAULT_HOST,
                       help="address to bind (default 127.0.0.1; any other needs --auth)")
    start.add_argument("--auth", action="store_true",
                       help="basic auth on Prefect and MLflow, a password generated into <home>/stack/credentials.json "
                            "(required off loopback; Ray always uses its token)")
    for key, port in DEFAULT_PORTS.items():
        start.add_argument("--" + key.replace("_", "-") + "-port", dest=f"{key}_port", type=int, default=port,
                           help=f"default {port}")
    start.add_argument("--artifacts", default="",
                       help="where MLflow keeps model artifacts: s3://bucket/prefix (credentials and endpoint from "
                            "the AWS variables of this shell) or a directory; default <home>/mlartifacts")
    start.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for every server to answer its health check")
    start.set_defaults(func=cmd_up)
    show = subparsers.add_parser("status", help="show which stack servers run and answer their health checks")
    _add_home(show)
    show.set_defaults(func=cmd_status)
    stop = subparsers.add_parser("down", help="stop every server `mmpipe up` started")
    _add_home(stop)
    stop.set_defaults(func=cmd_down)


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=_default_home(), help="project home (default $MMPIPE_HOME or ~/.mmpipe)")


def _error(err: Exception) -> int:
    console.err.print(f"mmpipe: error: {err}")
    return 2


def cmd_up(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser()
    ports = {key: getattr(args, f"{key}_port") for key in DEFAULT_PORTS}
    alive = running(home)
    if alive and all(alive.values()):
        console.out.print(f"the stack is already running (state in {state_path(home)})")
    elif not any(alive.values()):
        console.out.print(f"starting prefect, mlflow and ray on {args.host} (logs in {stack_dir(home) / 'logs'}) ...")
    else:
        stopped = ", ".join(name for name, ok in alive.items() if not ok)
        console.out.print(f"restarting {stopped} (stopped); the other servers keep running")
    try:
        urls = up(home, host=args.host, ports=ports, timeout_s=args.timeout, auth=args.auth,
                  artifacts=args.artifacts)
    except (StackError, ValueError, OSError) as err:
        return _error(err)
    _print_urls(home, urls)
    return 0


def _print_urls(home: Path, urls: dict[str, str]) -> None:
    console.out.print(f"Prefect UI     {urls['prefect_ui']}")
    console.out.print(f"MLflow UI      {urls['mlflow_ui']}")
    console.out.print(f"Ray dashboard  {urls['ray_dashboard']}  (token: {token_path(home)})")
    console.out.print(f"Ray address    {urls['ray_address']}" + (f"  or {urls['ray_client']}" if "ray_client" in urls else ""))
    console.out.print(f"\n# for clients (also in {env_path(home)}: `source {env_path(home)}`)")
    for key, value in client_env(home, urls).items():
        secret = key in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD")  # shown only in the 0600 file
        console.out.print(f"export {key}={'<in the file above>' if secret else shlex.quote(value)}")


def cmd_status(args: argparse.Namespace) -> int:
    rows = status(Path(args.home))
    console.out.print(f"{'service':<9}{'state':<10}{'pid':<9}{'healthy':<9}url")
    for row in rows:
        state = "running" if row["running"] else "stopped"
        pid = str(row["pid"] or "-")
        console.out.print(f"{row['service']:<9}{state:<10}{pid:<9}{'yes' if row['healthy'] else 'no':<9}{row['url'] or '-'}")
    return 0 if all(row["healthy"] for row in rows) else 1


def cmd_down(args: argparse.Namespace) -> int:
    try:
        stopped = down(Path(args.home))
    except StackError as err:
        return _error(err)
    console.out.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0
