"""`mmpipe up` / `status` / `down` against the real servers: health, clients, port clashes, no strays."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest

from pipelines import processes, services, stack
from tests import objectstore

pytestmark = pytest.mark.integration


def free_ports() -> dict[str, int]:
    """A free port per stack port, picked by the OS so leftover or parallel servers do not clash."""
    socks = []
    try:
        for _ in services.DEFAULT_PORTS:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return {key: sock.getsockname()[1] for key, sock in zip(services.DEFAULT_PORTS, socks)}
    finally:
        for sock in socks:
            sock.close()


def session_tree(home: Path) -> set[tuple[int, float]]:
    """(pid, create_time) of every process the recorded leaders started: descendants and session members."""
    state = services.read_state(home)
    leaders = {entry["pid"] for entry in state["services"].values()}
    found = set()
    for proc in psutil.process_iter():
        try:
            in_session = os.getsid(proc.pid) in leaders
            if proc.pid in leaders or in_session:
                found.add((proc.pid, proc.create_time()))
        except (OSError, psutil.Error):
            continue
    for pid in leaders:
        for child in psutil.Process(pid).children(recursive=True):
            found.add((child.pid, child.create_time()))
    return found


def still_running(procs: set[tuple[int, float]]) -> list[int]:
    alive = []
    for pid, created in procs:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def strays(home: Path) -> list[str]:
    """Processes that mention this home (command line or the stack's environment marker)."""
    marks = (str(home), str(services.ray_temp_dir(home)))
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            marked = proc.environ().get(processes.MARKER_ENV, "").startswith(str(home))
            if marked or any(mark in cmdline for mark in marks):
                found.append(f"{proc.pid} {cmdline[:120]}")
        except psutil.Error:
            continue
    return found


def client_env(home: Path) -> dict[str, str]:
    """What `source <home>/stack/env` would export."""
    env = {}
    for line in (home / "stack" / "env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line[len("export "):])[0].partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-home").resolve()
    ports = free_ports()
    started = time.monotonic()
    urls = stack.up(home, ports=ports, timeout_s=180)
    print(f"stack up in {time.monotonic() - started:.1f} s")
    yield SimpleNamespace(home=home, ports=ports, urls=urls, procs=session_tree(home))
    stack.down(home)  # a no-op after test_down_stops_everything; cleans up if an earlier test failed
    shutil.rmtree(services.ray_temp_dir(home), ignore_errors=True)  # Ray's session logs, outside tmp_path


def test_up_starts_three_healthy_servers(running_stack):
    home, urls, ports = running_stack.home, running_stack.urls, running_stack.ports
    assert httpx.get(f"{urls['prefect_api']}/health").status_code == 200
    assert httpx.get(f"{urls['mlflow_ui']}/health").status_code == 200
    assert httpx.get(f"{urls['ray_dashboard']}/api/gcs_healthz").status_code == 200
    assert urls["prefect_ui"] == f"http://127.0.0.1:{ports['prefect']}"
    assert urls["ray_address"] == f"127.0.0.1:{ports['ray']}"
    state = services.read_state(home)
    assert set(state["services"]) == {"prefect", "mlflow", "ray"}
    for name, entry in state["services"].items():
        assert Path(entry["log"]) == home / "stack" / "logs" / f"{name}.log"
        assert Path(entry["log"]).stat().st_size > 0
    assert (home / "stack" / "logs" / "ray-session" / "raylet.out").exists()
    rows = stack.status(home)
    assert [r["service"] for r in rows] == ["prefect", "mlflow", "ray"]
    assert all(r["running"] and r["healthy"] and r["pid"] for r in rows), rows
    env = client_env(home)
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0


def test_prefect_api_answers_a_client(running_stack):
    response = httpx.post(f"{running_stack.urls['prefect_api']}/flows/filter", json={})
    assert response.status_code == 200 and response.json() == []


def test_mlflow_serves_runs_logged_through_it_and_straight_to_sqlite(running_stack):
    from mlflow import MlflowClient

    home, server_url = running_stack.home, running_stack.urls["mlflow_ui"]
    via_server = MlflowClient(server_url)
    assert [e.name for e in via_server.search_experiments()] == ["Default"]
    run = via_server.create_run(via_server.create_experiment("via-server"))
    via_server.log_text(run.info.run_id, "through the server", "note.txt")
    assert list((home / "mlartifacts").glob(f"*/{run.info.run_id}/artifacts/note.txt"))

    # What the library does without a server: sqlite + file://<home>/mlartifacts/<experiment>.
    direct = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    location = (home / "mlartifacts" / "direct").as_uri()
    run = direct.create_run(direct.create_experiment("direct", artifact_location=location))
    direct.log_text(run.info.run_id, "straight to sqlite", "note.txt")
    response = httpx.get(f"{server_url}/get-artifact", params={"path": "note.txt", "run_uuid": run.info.run_id})
    assert response.status_code == 200 and response.text == "straight to sqlite"


def test_ray_head_requires_its_token_and_runs_tasks(running_stack):
    home, dashboard = running_stack.home, running_stack.urls["ray_dashboard"]
    env = client_env(home)
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert httpx.get(f"{dashboard}/api/version").status_code == 401
    assert httpx.get(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    driver = textwrap.dedent("""
        import ray
        ray.init(configure_logging=False, log_to_driver=False)   # RAY_ADDRESS from the env file

        @ray.remote
        def double(x):
            return 2 * x

        print("answer", ray.get(double.remote(21)))
    """)
    result = subprocess.run([sys.executable, "-c", driver], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=180)
    assert "answer 42" in result.stdout, result.stderr[-3000:]


def test_up_again_reports_the_running_stack(running_stack):
    before = services.read_state(running_stack.home)
    assert stack.up(running_stack.home, ports=running_stack.ports) == running_stack.urls
    assert services.read_state(running_stack.home) == before


@pytest.mark.fault
def test_metrics_logged_while_mlflow_is_down_arrive_after_up_restarts_it(running_stack, fault):
    """Fault: the MLflow server of the stack killed (SIGKILL to its process group) while a run logs."""
    import signal
    import threading

    from mlflow import MlflowClient

    from mmcore.tracking import MetricLogger, TrackingError, wait_until_reachable

    home, uri = running_stack.home, running_stack.urls["mlflow_ui"]
    run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("mlflow-down")).info.run_id
    logger = MetricLogger(uri, run_id)
    for step in range(5):
        logger.log({"loss": 10.0 - step}, step)
    assert logger.pending == [] and logger.failures == 0

    before = services.read_state(home)["services"]
    os.killpg(before["mlflow"]["pgid"], signal.SIGKILL)
    psutil.Process(before["mlflow"]["pid"]).wait(timeout=30)
    for step in range(5, 10):
        logger.log({"loss": 10.0 - step}, step)
        time.sleep(0.6)
    assert logger.failures >= 2 and len(logger.pending) == 5, "points the server did not take are kept"
    checkpointed = json.loads(json.dumps(logger.unsent()))  # what a checkpoint's manifest holds
    with pytest.raises(TrackingError, match="is not reachable.*waited 1 s to register"):
        wait_until_reachable(uri, 1, "register")
    registration = {}
    waiter = threading.Thread(target=lambda: registration.update(
        waited=wait_until_reachable(uri, 120, "register") or time.monotonic()))
    waiter.start()

    assert stack.running(home) == {"prefect": True, "mlflow": False, "ray": True}
    assert stack.up(home) == running_stack.urls, "up restarts the stopped server on its port"
    after = services.read_state(home)["services"]
    assert after["mlflow"]["pid"] != before["mlflow"]["pid"]
    assert [after[n]["pid"] for n in ("prefect", "ray")] == [before[n]["pid"] for n in ("prefect", "ray")]
    expected = [(step, 10.0 - step) for step in range(10)]
    # rank 0 died holding the kept points: the resumed run's logger sends them from the checkpoint
    assert MetricLogger(uri, run_id, kept=checkpointed).close(wait_s=120) == 0
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == expected, "none lost"
    # or it had sent them before it died: sent again, they are stored once
    assert logger.close(wait_s=120) == 0
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == expected, "none twice"
    waiter.join(timeout=120)
    assert "waited" in registration, "registration waited for the server and went on once it answered"
    fault("mlflow-down", "SIGKILL to the MLflow server of `mmpipe up` while a run logs; `mmpipe up` restarts it; "
          "the kept points also handed over as a checkpoint holds them (rank 0 dead)", 1,
          f"0 of 10 metric points ({logger.failures} failed sends kept and resent), none stored twice; a "
          "registration waiting for it went on; with the server gone past the deadline, a clear error")


FLOW = ("import json, sys\n"
        "from pipelines.flows import ingest_flow\n"
        "from pipelines.params import IngestParams\n"
        "summary = ingest_flow(IngestParams(url_list=sys.argv[1], allow_networks=['127.0.0.1/32']))\n"
        "print('SUMMARY ' + json.dumps(summary))\n")


def _flow_runs(api: str, flow: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow]}}, "sort": "START_TIME_ASC"}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()


@pytest.mark.fault
def test_a_flow_run_outlives_a_prefect_api_restart_and_a_rerun_repeats_no_work(running_stack, served_dir, tmp_path,
                                                                                 fault):
    """Fault: the Prefect server of the stack killed (SIGKILL to its process group) while an ingest flow runs
    against it, then restarted by `mmpipe up`; the same flow run again."""
    import signal

    from mmcore.data.synthetic.corpus import SampleSpec, make_sample

    server, root = served_dir
    url_list = make_sample(root / "prefect-restart", f"{server.url}/prefect-restart",
                           SampleSpec(synthetic=1200, digits=0, photos=False, defects=False, seed=5))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(client_env(running_stack.home), MMPIPE_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path))
    command = [sys.executable, "-c", FLOW, str(url_list)]
    api = running_stack.urls["prefect_api"]

    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not [r for r in _flow_runs(api, "ingest") if r["state_type"] == "RUNNING"]:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.5)
    prefect = services.read_state(running_stack.home)["services"]["prefect"]
    os.killpg(prefect["pgid"], signal.SIGKILL)
    psutil.Process(prefect["pid"]).wait(timeout=30)
    killed = time.monotonic()
    assert stack.up(running_stack.home) == running_stack.urls, "up restarts the stopped Prefect server"
    downtime = time.monotonic() - killed
    output = first.communicate(timeout=600)[0]
    runs = _flow_runs(api, "ingest")
    assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", (runs, output[-3000:])
    fetched = [path for path in server.requests if path.startswith("/prefect-restart/")]

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads(again.stdout.split("SUMMARY ", 1)[1])
    runs = _flow_runs(api, "ingest")
    assert [r["state_type"] for r in runs][1:] == ["COMPLETED"]
    fetched_again = [path for path in server.requests if path.startswith("/prefect-restart/")][len(fetched):]
    if runs[0]["state_type"] == "COMPLETED":
        assert summary["new"] is False, "the finished dataset version is reused, not ingested again"
        assert fetched_again == []
    else:  # the crashed run's finished downloads are resumed, not fetched again
        assert not set(fetched_again) & set(fetched)
    fault("prefect-restarted", f"SIGKILL to the Prefect server of `mmpipe up` while an ingest flow of 1,200 rows ran "
          f"against it; restarted by `mmpipe up` after {downtime:.0f} s down; the flow run again", 1,
          f"nothing: the first run ended {runs[0]['state_type'].lower()}; the re-run "
          + ("reused its dataset version and fetched no image" if summary["new"] is False
             else f"fetched {len(fetched_again)} images the first had not"))


def test_down_stops_everything(running_stack):
    home = running_stack.home
    procs = running_stack.procs | session_tree(home)  # now including Ray workers the driver started
    assert len(procs) > 10  # leaders, uvicorn, gcs_server, raylet, dashboard, agents, workers
    started = time.monotonic()
    assert sorted(stack.down(home)) == ["mlflow", "prefect", "ray"]
    print(f"stack down in {time.monotonic() - started:.1f} s")
    assert still_running(procs) == []
    assert strays(home) == []
    for key, port in running_stack.ports.items():
        assert services.port_free("127.0.0.1", port), key
    assert not (home / "stack" / "state.json").exists()
    assert [r["running"] for r in stack.status(home)] == [False, False, False]
    assert stack.down(home) == []  # idempotent


@pytest.mark.fault
def test_off_loopback_up_needs_auth_and_auth_rejects_anonymous_requests(tmp_path, train_dataset, object_store,
                                                                        fault):
    home = tmp_path.resolve()
    with pytest.raises(services.StackError, match="refusing to serve Prefect and MLflow on 0.0.0.0 without "
                                               "authentication: add --auth"):
        stack.up(home, host="0.0.0.0", ports=free_ports())
    assert services.read_state(home) is None and strays(home) == [], "nothing started"

    bucket = object_store.bucket()
    urls = stack.up(home, ports=free_ports(), timeout_s=180, auth=True, artifacts=f"{bucket}/mlflow")
    try:
        env = client_env(home)
        user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
        assert env["PREFECT_API_AUTH_STRING"] == f"{user}:{password}" and len(password) >= 24
        for path in (services.credentials_path(home), services.env_path(home)):
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        requests = {
            "prefect": ("POST", f"{urls['prefect_api']}/flows/filter", {"auth": (user, password)}),
            "mlflow": ("GET", f"{urls['mlflow_ui']}/api/2.0/mlflow/experiments/search?max_results=5",
                       {"auth": (user, password)}),
            "ray": ("GET", f"{urls['ray_dashboard']}/api/version", {"headers": {"Authorization": f"Bearer {token}"}}),
        }
        for name, (method, url, credentials) in requests.items():
            assert httpx.request(method, url, json={} if method == "POST" else None).status_code == 401, name
            wrong = {"auth": (user, "wrong")} if "auth" in credentials else {"headers": {"Authorization": "Bearer x"}}
            assert httpx.request(method, url, json={} if method == "POST" else None, **wrong).status_code in (401, 403)
            assert httpx.request(method, url, json={} if method == "POST" else None, **credentials).status_code == 200
        logs = "".join(p.read_text(errors="replace") for p in (home / "stack" / "logs").glob("*.log"))
        assert password not in logs and password not in json.dumps(services.read_state(home))
        leaks = _train_with_password_in_tracking_uri(home, env, urls, train_dataset)
        stored = object_store.keys(f"{bucket}/mlflow/")
        assert any(key.endswith("/weights.safetensors") for key in stored), "model artifacts go to the bucket"
        client = {k: v for k, v in {**os.environ, **env}.items() if not k.startswith("AWS_")}  # no bucket keys
        code = "import mmcore; print(type(mmcore.load_model('models:/mmpipe-contrastive@candidate')).__name__)"
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=client)
        assert loaded.returncode == 0 and "Clip" in loaded.stdout, loaded.stderr[-2000:]
    finally:
        stack.down(home)
    assert leaks == [], f"the password reached {leaks}"
    fault("auth", "`mmpipe up --host 0.0.0.0` without --auth; anonymous and wrong-password requests to each "
          "server of an --auth stack", 7, "nothing: refused before anything started; every request without "
          "the stack's credentials was refused (401; 403 for a wrong Ray token); the password in no log "
          "and not in state.json")
    fault("secrets", "a training run on the --auth stack whose tracking URI carries the MLflow password "
          "(`--set tracking.uri=http://user:PASSWORD@...`, no credentials in the environment)", 1,
          "nothing: the run logged and registered through that URI; the password is in none of its MLflow params "
          "or artifacts, the console, the project's logs, its run directory or Ray's session files")


def _train_with_password_in_tracking_uri(home: Path, env: dict, urls: dict, dataset) -> list[str]:
    """`mmpipe train` with the password in `tracking.uri` only; returns where the password turned up."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    uri = urls["mlflow_ui"].replace("://", f"://{user}:{password}@", 1)
    run_env = {k: v for k, v in {**os.environ, **env}.items()
               if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")}
    run_env.update(MMPIPE_HOME=str(home), COLUMNS="120")
    cli = Path(sys.executable).with_name("mmpipe")
    result = subprocess.run(
        [str(cli), "train", "contrastive", "--recipe", "debug", "--dataset", str(dataset.path),
         "--set", "optim.max_steps=4", "--set", "checkpoint.every_steps=2", "--set", f"tracking.uri={uri}"],
        capture_output=True, text=True, timeout=600, env=run_env)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = re.search(r'"mlflow_run_id": "(\w+)"', result.stdout).group(1)
    leaks = ["the console"] if password in result.stdout + result.stderr else []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        run = MlflowClient(urls["mlflow_ui"]).get_run(run_id)
        assert run.data.params["tracking.uri"] == urls["mlflow_ui"].replace("://", f"://{user}:***@", 1)
        leaks += [f"MLflow param {k}" for k, v in run.data.params.items() if password in v]
        artifacts = Path(download_artifacts(run_id=run_id, tracking_uri=urls["mlflow_ui"], dst_path=str(home / "dl")))
    allowed = {services.credentials_path(home), services.env_path(home)}
    for root in (home, services.ray_temp_dir(home)):
        for path in root.rglob("*"):
            if path.is_file() and path not in allowed and any(secret in path.read_bytes() for secret in
                                                              (password.encode(), objectstore.SECRET.encode())):
                leaks.append(str(path.relative_to(artifacts) if path.is_relative_to(artifacts) else path))
    return leaks


def test_port_taken_names_it_and_starts_nothing(tmp_path):
    home = tmp_path.resolve()
    ports = free_ports()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["mlflow"]))
        squatter.listen()
        with pytest.raises(services.StackError, match=rf"port {ports['mlflow']} \(mlflow\) .*--mlflow-port"):
            stack.up(home, ports=ports)
    assert services.read_state(home) is None
    assert strays(home) == []


def test_server_that_never_gets_healthy_leaves_nothing_running(tmp_path):
    home = tmp_path.resolve()
    with pytest.raises(services.StackError, match=r"prefect.* did not become healthy within 3 s"):
        stack.up(home, ports=free_ports(), timeout_s=3)  # Prefect needs ~25 s here
    shutil.rmtree(services.ray_temp_dir(home), ignore_errors=True)
    assert services.read_state(home) is None
    assert strays(home) == []
    assert "prefect server start" in (home / "stack" / "logs" / "prefect.log").read_text()
