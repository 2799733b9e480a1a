"""The local stack's servers: its files and state.json, ports and URLs, secrets, each server's command and
health check."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
SERVICES = ("prefect", "mlflow", "ray")
# Every port `up` binds, with the service it belongs to (the name a port clash is reported under).
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "ray": 6379, "ray_dashboard": 8265, "ray_client": 10001}
PORT_OWNER = {"prefect": "prefect", "mlflow": "mlflow", "ray": "ray",
              "ray_dashboard": "ray dashboard", "ray_client": "ray client"}


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


def write_state(home: Path, state: dict) -> None:
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


def check_ports(host: str, ports: dict[str, int]) -> None:
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


def resolve_ports(ports: dict[str, int] | None) -> dict[str, int]:
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


# ---------------------------------------------------------------------------------------------
# Commands and health checks


def _executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"cannot find `{name}` next to {sys.executable}; is mmpipe installed in this environment?")
    return str(path)


def write_private(path: Path, text: str) -> None:
    """A new file only its owner can read (a token, a password): created with that mode, so it is never
    readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def ray_token(home: Path) -> str:
    """Reuse the stack's token across restarts (clients keep working); make one the first time."""
    path = token_path(home)
    if not path.exists():
        write_private(path, secrets.token_hex(32))  # what `ray get-auth-token --generate` makes: 256 bits
    return path.read_text().strip()


def _secrets(home: Path) -> dict[str, str]:
    """The stack's user, password and MLflow's CSRF key, reused across restarts (clients and sessions keep
    working); made the first time."""
    path = credentials_path(home)
    if not path.exists():
        write_private(path, json.dumps({"user": AUTH_USER, "password": secrets.token_urlsafe(24),
                                         "mlflow_flask_secret_key": secrets.token_hex(32)}))
    return json.loads(path.read_text())


def stack_credentials(home: Path) -> tuple[str, str]:
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
        spec["env"]["PREFECT_SERVER_API_AUTH_STRING"] = ":".join(stack_credentials(home))
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
        user, password = stack_credentials(home)
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


def server_specs(home: Path, host: str, ports: dict[str, int], auth: bool, artifacts: str = "") -> dict[str, dict]:
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
    return {"Authorization": "Basic " + base64.b64encode(":".join(stack_credentials(home)).encode()).decode()}


def healthy(home: Path, entry: dict) -> bool:
    if _get(entry["health"]) != 200:
        return False
    if "authed" in entry:  # the credentials the clients are given must be the ones the server accepts
        return _get(entry["authed"], auth_headers(home, entry["auth"])) == 200
    return True
