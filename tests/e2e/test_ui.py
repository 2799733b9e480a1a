"""The UIs as a user drives them: `mmpipe up`, `mmpipe serve`, then headless Chromium starts the ingest
deployment from the Prefect UI's form; the landed dataset triggers retrain, and the MLflow UI shows
the registered model with its aliases. `mmpipe down` leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mmcore.data.dataset import DatasetVersion
from mmcore.data.synthetic.corpus import SampleSpec, make_sample
from pipelines import processes, stack
from tests.serving import stop_served
from tests.e2e.browser import chromium_driver, mlflow_ui_model_aliases, run_deployment_from_ui, wait_for_run_state

CLI = str(Path(sys.executable).with_name("mmpipe"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(api_url: str, path: str, body: dict) -> list | dict:
    request = urllib.request.Request(f"{api_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_for(what: str, probe, timeout_s: float, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            found = probe()
            if found:
                return found
        time.sleep(3)
    raise AssertionError(f"{what} did not happen in {timeout_s:.0f}s" + (f":\n{log.read_text()[-4000:]}" if log
                                                                         else ""))


@pytest.fixture
def stack_home(tmp_path):
    """`mmpipe up` on free ports in a fresh home; `mmpipe down` afterwards, checked to leave nothing."""
    home = tmp_path / "home"
    ports = {"prefect": _free_port(), "mlflow": _free_port(), "ray": _free_port(),
             "ray-dashboard": _free_port(), "ray-client": _free_port()}
    args = [CLI, "up", "--home", str(home)] + [x for k, v in ports.items() for x in (f"--{k}-port", str(v))]
    started = subprocess.run(args, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield home
    finally:
        members = processes.stack_processes(home)
        stopped = subprocess.run([CLI, "down", "--home", str(home)], capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stderr
        assert not [p for p in members if p.is_running() and p.status() != "zombie"], "down left processes running"


@pytest.fixture
def served(stack_home, tmp_path):
    """`mmpipe serve` against the stack, with triggered retrains on the debug recipe (contrastive only:
    the demo test runs retrain's other stages)."""
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_"))}
    env.update(MMPIPE_HOME=str(stack_home), PREFECT_RUNNER_POLL_FREQUENCY="2")  # default 10 s
    with open(log, "w") as out:
        process = subprocess.Popen([CLI, "serve", "--home", str(stack_home), "--retrain-recipe", "debug",
                                    "--retrain-fusion-recipe", "none", "--retrain-unified-recipe", "none"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield stack.client_env(stack_home), log
    finally:
        stop_served(process)  # before the stack goes down


def test_ingest_from_the_prefect_form_triggers_retrain_and_mlflow_shows_the_model(stack_home, served, served_dir,
                                                                                 tmp_path):
    env, log = served
    api = env["PREFECT_API_URL"]
    server, root = served_dir
    url_list = make_sample(root / "ui-corpus", f"{server.url}/ui-corpus",
                           SampleSpec(synthetic=240, digits=100, photos=False, defects=False, seed=11))
    _wait_for("the deployments' registration", lambda: len(_api(api, "/deployments/filter", {})) == 5, 180, log)

    with chromium_driver(tmp_path) as driver:
        run_url = run_deployment_from_ui(driver, api.removesuffix("/api"), "ingest", "mmpipe", {
            "url_list": str(url_list), "allow_networks": ["127.0.0.1/32"], "image_size": 48})
        wait_for_run_state(driver, run_url, "Completed", timeout_s=300)

        runs = _api(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["ingest"]}}})
        assert [r["parameters"]["params"]["image_size"] for r in runs] == [48], "the form's values reached the run"

        def retrain_done():
            found = _api(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["retrain"]}}})
            assert not [r for r in found if r["state_type"] in ("FAILED", "CRASHED")], found
            return [r for r in found if r["state_type"] == "COMPLETED"]

        retrain = _wait_for("the retrain triggered by dataset.landed", retrain_done, 900, log)[0]
        landed = DatasetVersion.open(retrain["parameters"]["params"]["dataset"])
        assert landed.verify() == [] and landed.manifest["source"]["path"] == str(url_list)
        assert landed.path.parent == stack_home / "datasets"
        artifacts = {a["key"]: a["data"] for a in _api(api, "/artifacts/filter", {
            "artifacts": {"flow_run_id": {"any_": [retrain["id"]]}}}) if a["key"]}
        assert "models:/mmpipe-contrastive/1" in artifacts["mmpipe-training"]
        assert f"{env['MLFLOW_TRACKING_URI']}/#/models/mmpipe-contrastive/versions/1" in artifacts["mmpipe-training"]
        assert "PROMOTED to champion" in artifacts["mmpipe-evaluation"] and "retrieval" in artifacts["mmpipe-evaluation"]

        aliases = mlflow_ui_model_aliases(driver, env["MLFLOW_TRACKING_URI"], "mmpipe-contrastive",
                                          expect={"candidate": "1", "champion": "1"}, timeout_s=120)
        assert aliases == {"candidate": "1", "champion": "1"}
