"""The cluster files (infra/, prefect.yaml): they parse, validate against the tools' own schemas, agree with the code, hold no secrets."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PREFECT_YAML = ROOT / "prefect.yaml"
FLOWS = ROOT / "pipelines" / "flows.py"
PARAMS = ROOT / "pipelines" / "params.py"
POOL_SCRIPT = INFRA / "prefect" / "create-work-pool.sh"

YAML_FILES = sorted(INFRA.rglob("*.yaml")) + [PREFECT_YAML]
TEXT_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file()) + [PREFECT_YAML]
FLOW_NAMES = {"ingest", "train", "evaluate", "infer", "retrain"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def prefect_yaml() -> dict:
    return load(PREFECT_YAML)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_is_ascii_and_opens_with_a_comment_saying_what_it_is(path):
    text = path.read_text(encoding="ascii")  # UnicodeDecodeError names the file
    lines = text.splitlines()
    first = lines[1] if lines[0].startswith("#!") else lines[0]
    assert first.startswith(("# ", "-- ")) and len(first) > 20, f"{path}: first line should say what the file is"


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_executable_bash_without_syntax_errors(path):
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(path)], check=True)


# ---- prefect.yaml ------------------------------------------------------------------------


def test_prefect_yaml_validates_against_prefects_own_models():
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    # Private to Prefect, pinned <3.9 in pyproject; an upgrade that moves it should fail here loudly.
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig

    spec = prefect_yaml()
    model = PrefectYamlModel.model_validate(spec)
    assert len(model.deployments) == 5
    triggers = TypeAdapter(list[DeploymentTriggerTypes])
    for deployment in spec["deployments"]:
        for schedule in deployment.get("schedules") or []:
            RawScheduleConfig.model_validate(schedule)
        triggers.validate_python(deployment.get("triggers") or [])


def flow_functions() -> dict[str, str]:
    """function name -> Prefect flow name, for every `@flow(name=...)` in pipelines/flows.py."""
    found = {}
    for node in ast.walk(ast.parse(FLOWS.read_text())):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "flow":
                    names = [k.value.value for k in dec.keywords if k.arg == "name"]
                    found[node.name] = names[0] if names else node.name
    return found


def test_deployments_point_at_the_five_flows_by_name():
    flows = flow_functions()
    deployed = set()
    for deployment in prefect_yaml()["deployments"]:
        path, _, func = deployment["entrypoint"].partition(":")
        assert (ROOT / path).resolve() == FLOWS, deployment["entrypoint"]
        assert func in flows, f"{deployment['entrypoint']}: no @flow function {func!r} in {FLOWS}"
        assert deployment["name"] == "mmpipe"
        deployed.add(flows[func])
    assert deployed == FLOW_NAMES  # ingest/mmpipe, train/mmpipe, evaluate/mmpipe, infer/mmpipe, retrain/mmpipe


def test_every_deployment_uses_the_pool_that_the_pool_script_creates():
    created = re.findall(r"prefect work-pool create (\S+) --type process", POOL_SCRIPT.read_text())
    assert created == ["mmpipe-process"]
    for deployment in prefect_yaml()["deployments"]:
        assert deployment["work_pool"]["name"] in created, deployment["entrypoint"]
    assert "--pool mmpipe-process --type process" in (INFRA / "prefect" / "start-worker.sh").read_text()
    k8s_worker = load(INFRA / "prefect" / "worker-k8s.yaml")
    command = k8s_worker["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--pool") + 1] in created


def test_prefect_yaml_builds_nothing_and_pulls_a_working_directory():
    spec = prefect_yaml()
    assert spec["build"] is None and spec["push"] is None
    (step,) = spec["pull"]
    assert list(step) == ["prefect.deployments.steps.set_working_directory"]


def retrain() -> dict:
    return next(d for d in prefect_yaml()["deployments"] if d["entrypoint"].endswith(":retrain_flow"))


def test_retrain_runs_when_a_dataset_lands_and_its_cron_starts_off():
    (trigger,) = retrain()["triggers"]
    assert trigger["type"] == "event" and trigger["enabled"] is True
    assert trigger["expect"] == ["dataset.landed"]
    assert trigger["match"] == {"prefect.resource.id": "mmpipe.dataset.*"}
    assert trigger["parameters"] == {"params": {"dataset": "{{ event.payload.path }}"}}
    (schedule,) = retrain()["schedules"]
    assert schedule["cron"] and schedule["active"] is False


def test_the_trigger_matches_the_event_the_ingest_flow_emits():
    tree = ast.parse(FLOWS.read_text())
    constants = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "emit_event"]
    assert calls, "the ingest flow no longer emits an event"
    call = calls[0]
    event = call.args[0]
    assert (constants.get(event.id) if isinstance(event, ast.Name) else event.value) == "dataset.landed"
    kw = {k.arg: k.value for k in call.keywords}
    resource = dict(zip([k.value for k in kw["resource"].keys], kw["resource"].values))
    resource_id = resource["prefect.resource.id"]
    assert isinstance(resource_id, ast.JoinedStr) and resource_id.values[0].value == "mmpipe.dataset."
    assert "path" in [k.value for k in kw["payload"].keys]
    if PARAMS.exists():  # the templated parameter must be a field of the retrain flow's model
        params = next(n for n in ast.walk(ast.parse(PARAMS.read_text()))
                      if isinstance(n, ast.ClassDef) and n.name == "RetrainParams")
        assert "dataset" in [s.target.id for s in params.body if isinstance(s, ast.AnnAssign)]


# ---- Ray ----------------------------------------------------------------------------------


def ray_minor() -> str:
    return ".".join(importlib.metadata.version("ray").split(".")[:2])


def test_launcher_config_passes_rays_own_validation_with_token_auth_on_every_node():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(INFRA / "ray" / "cluster.yaml")
    validate_config(prepare_config(cfg))  # raises on a field Ray does not know
    for command in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token ray start" in command
    assert "~/.ray/auth_token" in cfg["file_mounts"]  # one token everywhere
    assert any(t["resources"].get("GPU") for t in cfg["available_node_types"].values())
    for image in (cfg["docker"]["image"], cfg["docker"]["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray_minor()}."), f"{image}: not the Ray the code pins"


def ray_containers(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifest_is_a_raycluster_with_head_cpu_and_gpu_groups():
    cluster = load(INFRA / "kuberay" / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"].startswith(ray_minor() + ".")
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for group in groups.values():
        assert {"minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # a map of strings in the CRD
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1


def test_every_ray_container_takes_the_same_token_from_one_secret():
    cluster = load(INFRA / "kuberay" / "raycluster.yaml")
    envs = [c["env"] for c in ray_containers(cluster)] + [cluster["spec"]["autoscalerOptions"]["env"]]
    refs = set()
    for env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"different token sources: {refs}"


# ---- servers --------------------------------------------------------------------------------


def test_mlflow_auth_config_has_no_password_and_a_valid_default_permission():
    config = configparser.ConfigParser()
    config.read(INFRA / "mlflow" / "auth.ini")
    section = config["mlflow"]
    assert section["default_permission"] in {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    assert section["database_uri"].startswith("postgresql")
    assert "admin_password" not in section  # comes from MLFLOW_AUTH_ADMIN_PASSWORD
    assert "--app-name basic-auth" in (INFRA / "mlflow" / "start-server.sh").read_text()


SECRET_KEY = re.compile(r"(?i)(?<![\w${])([A-Za-z0-9_]*(?:password|token|secret|auth_string|access_key)[A-Za-z0-9_]*)"
                        r"\s*([:=])\s*[\"']?([^\s\"'#,]*)")
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")


def is_reference(value: str) -> bool:
    """A placeholder (<...>), an env/compose/shell reference ($X, ${X}, $(cmd)), a file path, or nothing."""
    return value == "" or value.startswith(("<", "$", "~", "/"))


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_holds_a_literal_secret(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        comment = line.lstrip().startswith(("#", "--"))
        for name, sep, value in SECRET_KEY.findall(line):
            if comment and sep == ":":
                continue  # prose ("secret: the token ..."); commands and env lines in comments still count
            assert is_reference(value), f"{path}:{number}: {name} has a literal value"
        for value in URL_CREDENTIALS.findall(line):
            assert is_reference(value), f"{path}:{number}: a URL carries a password"


@pytest.mark.parametrize("path", [INFRA / "kuberay" / "raycluster.yaml", INFRA / "prefect" / "worker-k8s.yaml"],
                         ids=lambda p: p.name)
def test_kubernetes_secrets_come_from_secret_refs(path):
    secretish = re.compile(r"(?i)(password|token|auth_string|secret)(?!_path)")
    entries = []

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and ("value" in node or "valueFrom" in node):
                entries.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(load(path))
    secret_entries = [e for e in entries if secretish.search(e["name"])]
    assert secret_entries
    for entry in secret_entries:
        assert "secretKeyRef" in entry.get("valueFrom", {}), f"{path}: {entry['name']} is not from a Secret"


def test_compose_takes_every_secret_from_the_env_file():
    services = load(INFRA / "compose.yaml")["services"]
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"(?i)password|secret|auth_string|access_key", key):
                assert str(value).startswith("${"), f"compose service {name}: {key} is not from the env file"
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)  # the TLS proxy exposes them


def test_the_docs_page_names_only_files_that_exist():
    text = (ROOT / "docs" / "cluster.md").read_text(encoding="ascii")
    named = set(re.findall(r"infra/[\w./-]+\w", text))
    assert named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/cluster.md names missing files: {missing}"


# ---- storage: one bucket, no shared filesystem ------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    lines = [line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"[A-Z_]+=", line)]
    return dict(lines)


def k8s_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_every_node_and_worker_reads_and_writes_one_bucket_and_nothing_mounts_a_shared_filesystem(monkeypatch):
    from mmcore import storage

    cluster = load(INFRA / "kuberay" / "raycluster.yaml")
    worker = load(INFRA / "prefect" / "worker-k8s.yaml")
    containers = ray_containers(cluster) + worker["spec"]["template"]["spec"]["containers"]
    locations, key_sources = set(), set()
    for container in containers:
        env = k8s_env(container)
        locations.add(env["MMPIPE_STORAGE"]["value"])
        key_sources |= {env[name]["valueFrom"]["secretKeyRef"]["name"]
                        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        assert "MMPIPE_HOME" not in env  # the home (logs, scratch) is the pod's own disk
    launcher = load(INFRA / "ray" / "cluster.yaml")
    node_env = env_file(INFRA / "ray" / "node.env.example")
    worker_env = env_file(INFRA / "prefect" / "worker.env.example")
    locations |= {node_env["MMPIPE_STORAGE"], worker_env["MMPIPE_STORAGE"]}
    assert len(locations) == 1 and len(key_sources) == 1, (locations, key_sources)
    for env in (node_env, worker_env):
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env) and "MMPIPE_HOME" not in env

    monkeypatch.setenv("MMPIPE_STORAGE", locations.pop())
    assert storage.is_remote(storage.root() / "datasets"), "the code does not read MMPIPE_STORAGE as a bucket"

    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    pod_specs = [g["template"]["spec"] for g in groups] + [worker["spec"]["template"]["spec"]]
    volumes = [v for spec in pod_specs for v in spec.get("volumes", [])]
    assert not [v for v in volumes if "persistentVolumeClaim" in v or "nfs" in v]
    assert not [o for o in launcher["docker"]["run_options"] if o.startswith(("--volume", "-v "))]
    assert "mount" not in " ".join(launcher.get("initialization_commands") or [])
