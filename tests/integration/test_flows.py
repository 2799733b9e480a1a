"""The Prefect flows on a real Prefect API (test harness): in-process runs, and deployments served by
`mmpipe serve` in another process and started through the API, as the UI's Run button does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmcore.data.dataset import MANIFEST, DatasetVersion
from mmcore.data.synthetic.corpus import SampleSpec, make_sample
from pipelines.params import IngestParams
from tests.serving import stop_served

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory, mmpipe_home):
    """A real Prefect API server (sqlite in a temp dir) for this module; yields its URL."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):  # the 30 s default is tight on 2 cores
        yield PREFECT_API_URL.value()
    patch.undo()


@pytest.fixture(scope="module")
def small_list(served_dir):
    server, root = served_dir
    return make_sample(root / "flow-corpus", f"{server.url}/flow-corpus",
                       SampleSpec(synthetic=120, digits=60, photos=False, defects=True, seed=3))


def _artifacts(flow_run_id) -> dict[str, str]:
    """key-or-type -> data of the artifacts a flow run (and its tasks) left."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key or f"{a.type}:{a.id}": a.data for a in found}


def _run_logs_show(flow_run_id, text: str, wait_s: float = 30) -> bool:
    """Whether the flow run's logs, as the UI shows them, have a line with `text` (sent in the background)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            found = "\n".join(log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200))
            if text in found or time.monotonic() > deadline:
                return text in found
            time.sleep(1)


def _landed_events(api_url: str, dataset_id: str, expected: int, wait_s: float = 30) -> int:
    """How many dataset.landed events the API recorded for this version (persisted asynchronously)."""
    import httpx

    body = {"filter": {"event": {"name": ["dataset.landed"]},
                       "resource": {"id": [f"mmpipe.dataset.{dataset_id}"]}}, "limit": 50}
    deadline = time.monotonic() + wait_s
    while True:
        found = httpx.post(f"{api_url}/events/filter", json=body, timeout=30).json()["events"]
        if len(found) >= expected or time.monotonic() > deadline:
            return len(found)
        time.sleep(1)


def test_ingest_flow_versions_the_list_in_the_storage_bucket_leaves_artifacts_and_reuses_it(
        prefect_api, small_list, served_dir, object_store, monkeypatch):
    from pipelines.flows import ingest_flow
    from pipelines.params import IngestParams

    server, _ = served_dir
    storage_root = f"{object_store.bucket()}/mmpipe"
    monkeypatch.setenv("MMPIPE_STORAGE", storage_root)  # as on a cluster: versions go to the bucket by default
    params = IngestParams(url_list=str(small_list), allow_networks=["127.0.0.1/32"])
    state = ingest_flow(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["path"].startswith(f"{storage_root}/datasets/urls-"), summary["path"]
    assert f"{summary['path'][5:].split('/', 1)[1]}/{MANIFEST}" in object_store.keys(storage_root)
    version = DatasetVersion.open(summary["path"])
    assert version.verify() == []
    rows = summary["rows"]
    assert rows["in"] == rows["kept"] + sum(rows["rejected"].values()) and rows["rejected"]
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert version.id in artifacts["mmpipe-dataset"] and "Rejected rows by reason" in artifacts["mmpipe-dataset"]
    progress = [v for k, v in artifacts.items() if k.startswith("progress:")]
    assert progress and max(progress) == 100.0, "the download and filter bars reached the UI as progress artifacts"
    assert _run_logs_show(state.state_details.flow_run_id, f"dataset {version.id}: kept {rows['kept']} of "
                          f"{rows['in']} rows"), "mmpipe's own lines reach the flow run's logs in the UI"

    requests_before = len(server.requests)
    again = ingest_flow(params, return_state=True)
    assert again.is_completed() and again.result()["path"] == summary["path"]
    assert len(server.requests) == requests_before, "a re-run reuses the finished version, nothing is downloaded"
    # The new version was announced once; the reuse is not a new landing (no second retrain).
    assert _landed_events(prefect_api, version.id, expected=2, wait_s=15) == 1


def test_a_failing_task_fails_the_run_with_the_reason_and_writes_nothing(prefect_api, tmp_path):
    from pipelines.flows import ingest_flow
    from pipelines.params import IngestParams

    missing = tmp_path / "nowhere" / "urls.parquet"
    state = ingest_flow(IngestParams(url_list=str(missing), out=str(tmp_path / "v1")), return_state=True)
    assert state.is_failed()
    assert str(missing) in state.message
    assert not (tmp_path / "v1").exists()


@pytest.fixture(scope="module")
def served(prefect_api, mmpipe_home, tmp_path_factory):
    """`mmpipe serve` in its own process against the harness's API; yields its log path."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PREFECT_API_URL=prefect_api, MMPIPE_HOME=str(mmpipe_home),
               PREFECT_RUNNER_POLL_FREQUENCY="2")  # default 10 s
    cli = Path(sys.executable).with_name("mmpipe")
    with open(log, "w") as out:
        process = subprocess.Popen([str(cli), "serve", "--no-retrain-on-landing"], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_deployments(["ingest/mmpipe", "train/mmpipe", "evaluate/mmpipe", "infer/mmpipe",
                                "retrain/mmpipe"], log, process)
        yield log
    finally:
        stop_served(process)


def _wait_for_deployments(names: list[str], log: Path, process, timeout_s: float = 180) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"mmpipe serve exited: {log.read_text()[-3000:]}"
            try:
                for name in names:
                    client.read_deployment_by_name(name)
                return
            except Exception:  # noqa: BLE001 - not registered yet
                time.sleep(2)
    raise AssertionError(f"deployments not registered in {timeout_s}s: {log.read_text()[-3000:]}")


def test_served_ingest_deployment_runs_from_the_api_to_completion(served, small_list, tmp_path, mmpipe_home):
    from prefect.deployments import run_deployment

    out = tmp_path / "via-deployment"
    run = run_deployment("ingest/mmpipe", timeout=600, parameters={"params": {
        "url_list": str(small_list), "out": str(out), "allow_networks": ["127.0.0.1/32"]}})
    assert run.state.is_completed(), f"{run.state.message}\n{served.read_text()[-3000:]}"
    assert DatasetVersion.open(out).verify() == []
    artifacts = _artifacts(run.id)
    assert DatasetVersion.open(out).id in artifacts["mmpipe-dataset"]
    # The flow-run process wrote the libraries' output (records of loggers other than mmpipe's, such as Prefect's
    # HTTP client) to a log under the project home.
    logs = [p.read_text() for p in (mmpipe_home / "logs").glob("*-flow-ingest-*.log")]
    assert any(f"ingesting {DatasetVersion.open(out).manifest['rows']['in']} rows" in text and
               re.search(r"^\S+ \S+ INFO (?!mmpipe)[\w.]+: ", text, re.M) for text in logs), logs


@pytest.mark.fault
def test_the_server_refuses_invalid_parameters_with_the_reason(served, fault):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train/mmpipe")
        secret = "http://mmpipe:Pa55-not-for-the-ui@127.0.0.1:5000"
        for params, field in [({"dataset": "d", "zero_stage": 5}, "zero_stage"),
                              ({"dataset": "d", "recipe": "huge"}, "recipe"),
                              ({"zero_stage": 1}, "dataset"),
                              ({"dataset": "d", "overrides": [f"tracking.uri={json.dumps(secret)}"]}, "overrides")]:
            with pytest.raises(PrefectHTTPStatusError) as refused:
                client.create_flow_run_from_deployment(deployment.id, parameters={"params": params})
            assert field in refused.value.response.text
        # A password typed into the form is refused before a flow run could store it and show it in the UI.
        stored = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        assert all("Pa55-not-for-the-ui" not in json.dumps(run.parameters) for run in stored)
    fault("secrets", "a password in a flow parameter (`overrides: tracking.uri=\"http://user:PASSWORD@...\"`) sent to "
          "the API as the UI's form would", 1, "nothing: the API server refused the run naming the field; no "
          "stored flow run holds the password")


def test_a_failed_training_run_shows_the_error_and_registers_nothing(served, tmp_path, mmpipe_home):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    client = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    before = len(client.search_model_versions())
    missing = tmp_path / "no-dataset"
    run = run_deployment("train/mmpipe", timeout=600,
                         parameters={"params": {"dataset": str(missing), "recipe": "debug"}})
    assert run.state.is_failed()
    assert str(missing) in run.state.message
    assert len(client.search_model_versions()) == before


@pytest.mark.fault
@pytest.mark.long
def test_twenty_flow_runs_submitted_at_once_all_complete_once(served, served_dir, prefect_api, fault):
    """20 ingest runs of one URL list created through the API in one burst, as 20 clicks on the UI's Run
    button would: every one completes, none is lost or run twice, the dataset is made once and reused."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    server, root = served_dir
    url_list = make_sample(root / "twenty", f"{server.url}/twenty",
                           SampleSpec(synthetic=60, digits=20, photos=False, defects=False, seed=21))
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("ingest/mmpipe")
        ids = [client.create_flow_run_from_deployment(deployment.id, parameters={"params": {
            "url_list": str(url_list), "allow_networks": ["127.0.0.1/32"]}}).id for _ in range(20)]
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            if all(run.state.is_final() for run in runs) or time.monotonic() - started > 1800:
                break
            time.sleep(5)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                      task_run_filter=TaskRunFilter())
    seconds = time.monotonic() - started
    assert len(runs) == 20 and all(run.state.is_completed() for run in runs), [run.state for run in runs]
    assert all(run.run_count == 1 for run in runs), "no flow run ran twice"
    ingests = [t for t in tasks if t.name.startswith("ingest")]
    assert sorted(t.flow_run_id for t in ingests) == sorted(ids) and all(t.run_count == 1 for t in ingests)
    version = DatasetVersion.open(IngestParams(url_list=str(url_list), allow_networks=["127.0.0.1/32"]).to_config().out)
    assert _landed_events(prefect_api, version.id, expected=1) == 1, "one new version, reused 19 times"
    images = [p for p in server.requests if p.startswith("/twenty/")]
    assert len(images) == len(set(images)), "no image downloaded twice"
    fault("load-flows", "20 runs of the ingest deployment created through the Prefect API at once (`mmpipe serve`, "
          "one at a time)", 20, f"nothing: 20 of 20 completed, each once, in {seconds:.0f} s; the dataset was made "
          "once and reused by the other 19; no image fetched twice")


def test_retrain_trains_the_language_stage_then_llavas_two_phases_on_its_champion(prefect_api, trained, train_dataset,
                                                                                  mmpipe_home):
    from mmcore import registry
    from mmcore.config import TrackingConfig
    from mmcore.tracking import resolve_uri
    from pipelines.flows import retrain_flow
    from pipelines.params import FusionSettings, LanguageSettings, RetrainParams

    here = 'cluster.executor="here"'
    result = retrain_flow(RetrainParams(
        dataset=str(train_dataset.path), skip_contrastive=True, skip_unified=True, skip_language=False,
        language=LanguageSettings(recipe="debug-language", num_workers=1, overrides=[here]),
        fusion=FusionSettings(recipe="debug-instruction", alignment_recipe="debug-alignment", num_workers=1,
                              overrides=[here, f'model.parent="{trained.model_uri}"'])))
    uri = resolve_uri(TrackingConfig())
    assert result.language_decision.promoted, result.language_decision.reason  # the first language champion
    assert registry.resolve_version("models:/mmpipe-language@champion", uri)[1] == result.language["model_version"]
    aligned = registry.resolve_version("models:/mmpipe-fusion@aligned", uri)[1]
    tags = registry.version_tags("mmpipe-fusion", result.fusion["model_version"], uri)
    assert tags["lm_parent_model"] == f"mmpipe-language/{result.language['model_version']}"
    assert tags["start_model"] == f"mmpipe-fusion/{aligned}" != f"mmpipe-fusion/{result.fusion['model_version']}"
    assert result.fusion_decision is not None and [t["run_name"].split("-")[1] for t, _ in result.stages()] == [
        "language", "instruction"]


def test_retrain_trains_and_gates_the_fusion_stage_on_an_ingested_conversation_file(
        prefect_api, trained, train_dataset, photo_conversations, served_dir, mmpipe_home):
    """`instructions`: a conversation file the flow ingests (images by path under its directory); the fusion
    stage trains and is gated on it; side by side leaves it out (another test split); a URL list there is refused."""
    from pydantic import ValidationError

    from mmcore import registry
    from mmcore.config import TrackingConfig
    from mmcore.tracking import resolve_uri
    from pipelines.flows import retrain_flow
    from pipelines.params import FusionSettings, RetrainParams
    from tests.integration.conftest import PHOTO_CONVERSATIONS

    _, root = served_dir
    chats = IngestParams(url_list=str(PHOTO_CONVERSATIONS), kind="instructions",
                         images=str(root / "photo-corpus" / "images"))
    result = retrain_flow(RetrainParams(
        dataset=str(train_dataset.path), skip_contrastive=True, skip_unified=True, instructions=chats,
        fusion=FusionSettings(recipe="debug-fusion", num_workers=1, batch_size=8, max_steps=20,
                              overrides=['cluster.executor="here"', f'model.parent="{trained.model_uri}"',
                                         "data.val_batches=1"])))
    assert result.instructions["rows"]["kept"] == len(json.loads(PHOTO_CONVERSATIONS.read_text()))
    tags = registry.version_tags("mmpipe-fusion", result.fusion["model_version"], resolve_uri(TrackingConfig()))
    assert tags["dataset_id"] == result.instructions["id"] != train_dataset.id
    vqa = result.fusion_decision.candidate.metrics["vqa"]
    assert result.fusion_decision.candidate.dataset_id == result.instructions["id"] and "contains_accuracy" in vqa
    assert result.candidates() == [], "its vqa is not the caption dataset's"
    with pytest.raises(ValidationError, match="instructions: a conversation file for the fusion stage; set its kind"):
        RetrainParams(dataset=str(train_dataset.path), instructions=IngestParams(url_list=str(PHOTO_CONVERSATIONS)))


def test_the_infer_flow_keeps_a_models_scores_beside_the_dataset_and_reuses_them(prefect_api, trained, train_dataset):
    """The `infer` flow (the form of `mmpipe infer`): a derived version written once, its artifact in the UI; the
    same run again computes nothing."""
    from mmcore.data.derived import stored
    from pipelines.flows import infer_flow
    from pipelines.params import InferParams

    params = InferParams(model=f"models:/{trained.model_name}@candidate", dataset=str(train_dataset.path),
                         output="embeddings")
    state = infer_flow(params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    derived = next(d for d in stored(train_dataset) if str(d.path) == summary["path"])
    assert derived.manifest["model"] == summary["model"] == trained.model_uri and summary["rows"] == \
        train_dataset.manifest["rows"]["kept"]
    assert summary["columns"] == ["image_embedding", "text_embedding"]
    artifact = _artifacts(state.state_details.flow_run_id)["mmpipe-derived"]
    assert f"embeddings of dataset {train_dataset.id}" in artifact and trained.model_uri in artifact
    again = infer_flow(params, return_state=True).result()
    assert again["computed"] == 0 and again["path"] == summary["path"]
