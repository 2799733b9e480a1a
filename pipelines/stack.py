"""The local stack's lifecycle: `up` (start, or restart what stopped), `status` and `down` of a Prefect server,
an MLflow server and a Ray head, and the environment its clients need."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

from mmcore import storage
from pipelines.processes import find_process, kill_processes, record_children, spawn, stop_services, wait_healthy
from pipelines.services import (DEFAULT_HOST, LOOPBACK, SERVICES, StackError, check_ports, stack_credentials,
                                ray_token, resolve_ports, server_specs, write_private, write_state,
                                credentials_path, env_path, healthy, port_free, ray_temp_dir, read_state,
                                stack_dir, state_path, token_path, urls_for)


def running(home: Path) -> dict[str, bool]:
    """Which recorded services still have their process (empty when nothing is recorded)."""
    state = read_state(home)
    if state is None:
        return {}
    return {name: find_process(e["pid"], e.get("create_time")) is not None for name, e in state["services"].items()}


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
    resolved = resolve_ports(ports)
    check_ports(host, resolved)
    _check_ray_dashboard_deps()
    if artifacts:
        location = storage.path(artifacts)  # a local path or s3://: anything else is refused here
        storage.check(artifacts)
        if isinstance(location, Path):  # relative to where `mmpipe up` was typed, not the server's directory
            artifacts = str(location.expanduser().absolute())
    (stack_dir(home) / "logs").mkdir(parents=True, exist_ok=True)
    ray_token(home)
    specs = server_specs(home, host, resolved, auth, artifacts)
    urls = urls_for(host, resolved)
    state = {"host": host, "ports": resolved, "urls": urls, "auth": auth, "artifacts": artifacts, "services": {}}
    try:
        for name, spec in specs.items():
            state["services"][name] = spawn(home, name, spec)
            write_state(home, state)  # written as each starts: an interrupted `up` can still be stopped
        wait_healthy(home, state["services"], timeout_s)
        record_children(state["services"])
        write_state(home, state)
        _link_ray_logs(home)
    except BaseException:  # KeyboardInterrupt included: never leave half a stack behind
        stop_services(home, state)
        state_path(home).unlink(missing_ok=True)
        raise
    _write_env(home, urls)
    return urls


def _restart(home: Path, names: list[str], timeout_s: float) -> dict[str, str]:
    """Start again the services of a running stack whose process is gone (crashed, killed), on the
    host and ports the stack was started with; the others keep running."""
    state = read_state(home)
    specs = server_specs(home, state["host"], state["ports"], state.get("auth", False), state.get("artifacts", ""))
    restarted = {}
    for name in names:
        entry = state["services"][name]
        kill_processes([p for pid, created in entry.get("children", []) if (p := find_process(pid, created))], signal.SIGKILL)
        if not port_free(state["host"], entry["port"]):
            raise StackError(f"{name} stopped but port {entry['port']} is still taken; run `mmpipe down`, then `mmpipe up`")
        restarted[name] = state["services"][name] = spawn(home, name, specs[name])
        write_state(home, state)
    wait_healthy(home, restarted, timeout_s)  # on failure the stack stays partly up, as it was: `mmpipe down`
    record_children(restarted)
    write_state(home, state)
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
    write_private(env_path(home), "\n".join(lines) + "\n")  # it may hold the password


def status(home: Path) -> list[dict]:
    """One row per service: service, running, pid, url, healthy (checked now)."""
    home = Path(home).expanduser().resolve()
    state = read_state(home) or {"services": {}, "urls": {}}
    rows = []
    for name in SERVICES:
        entry = state["services"].get(name)
        proc = find_process(entry["pid"], entry.get("create_time")) if entry else None
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
    stopped = stop_services(home, state)
    state_path(home).unlink(missing_ok=True)
    env_path(home).unlink(missing_ok=True)
    return stopped


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
        user, password = stack_credentials(home)
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
