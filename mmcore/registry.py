"""The MLflow model registry: log a model bundle as a pyfunc and register it once per run, fetch a version's
bundle (safetensors and JSON only: nothing else is loaded), aliases, tags and lineage.

`load_model("models:/name@alias")` returns the native nn.Module; `mlflow.pyfunc.load_model` works in any
client that has mmcore installed (mmcore/pyfunc.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from mmcore.bundle import ModelBundle
from mmcore.config import TrackingConfig
from mmcore.models.preprocess import Preprocessor
from mmcore.pause import pause_point
from mmcore.tracking import TrackingError, fluent_uri, quick_http, resolve_uri
from mmcore.pyfunc import signature, pyfunc_requirements


PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")


def log_and_register(uri: str, run_id: str, bundle_dir: Path, name: str, alias: str, tags: dict[str, str]) -> str:
    """Log the bundle as a pyfunc model in the run and register it with `alias`; returns the version.

    Once per run: a version registered from this run before (a command killed after registering)
    is the one returned, given its alias. If registration or aliasing fails, the half-made model
    version is deleted again.
    """
    client = MlflowClient(uri)
    registered = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if registered:
        version = min(registered, key=lambda v: int(v.version)).version
        client.set_registered_model_alias(name, alias, version)
        return str(version)
    bundle = ModelBundle.at(bundle_dir)
    model, _ = open_bundle(bundle, uri)
    with fluent_uri(uri):
        with mlflow.start_run(run_id=run_id):
            files = {path.name: str(path) for path in sorted(bundle.directory.iterdir()) if path.is_file()}
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE), artifacts=files,
                                           signature=signature(model), input_example=None,
                                           pip_requirements=pyfunc_requirements())
        version = None
        try:
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            pause_point("model-registered")
            client.set_registered_model_alias(name, alias, version.version)
        except Exception:
            if version is not None:
                client.delete_model_version(name, version.version)
            raise
    return str(version.version)


def model_files(uri: str, tracking_uri: str | None = None) -> ModelBundle:
    """models:/name@alias (or /version) -> its bundle's files, downloaded (config read without building).

    Only a bundle of safetensors and JSON is accepted: a version whose files hold anything else (a
    pickle would run code when loaded) or a link out of their directory is refused, naming the file.
    Without `tracking_uri`: the project's registry (resolve_uri: $MLFLOW_TRACKING_URI, else its sqlite).
    """
    try:
        with fluent_uri(tracking_uri or resolve_uri(TrackingConfig())):
            directory = Path(mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/artifacts"))
    except Exception as err:  # noqa: BLE001
        raise TrackingError(f"cannot load {uri}: {str(err).splitlines()[0][:300]}") from None
    return ModelBundle.checked(directory, uri)


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, Preprocessor]:
    """models:/name@alias (or /version) -> (native module in eval mode, its preprocessor)."""
    return open_bundle(model_files(uri, tracking_uri), tracking_uri)


def open_bundle(bundle: ModelBundle, tracking_uri: str | None = None) -> tuple[torch.nn.Module, Preprocessor]:
    """A fetched bundle loaded; LoRA adapters registered apart from their LM get that base from the registry."""
    return bundle.load(model_files(bundle.base, tracking_uri).directory if bundle.base else None)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias or models:/name/version -> (name, alias, version)."""
    if not uri.startswith("models:/") or len(uri) <= len("models:/"):
        raise ValueError(f"{uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not version:
        raise ValueError(f"{uri!r} names no version or alias; use models:/{name}@champion or models:/{name}/1")
    return name, None, version


def resolve_version(uri: str, tracking_uri: str) -> tuple[str, str]:
    """(name, version) a registry URI points at, with a clear error for unknown names, versions, aliases."""
    name, alias, version = parse_model_uri(uri)
    client = MlflowClient(tracking_uri)
    try:
        with quick_http():
            client.get_registered_model(name)
    except Exception as err:  # noqa: BLE001
        if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
            raise ValueError(f"no registered model named {name!r} in {tracking_uri}") from None
        raise TrackingError(f"MLflow at {tracking_uri} is not reachable: {str(err).splitlines()[0][:300]}") from None
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception:  # noqa: BLE001
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ValueError(f"registered model {name!r} has no {what}") from None
    return name, str(found.version)


def alias_version(name: str, alias: str, tracking_uri: str) -> str | None:
    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such alias
        return None


def set_alias(name: str, alias: str, version: str, tracking_uri: str) -> None:
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)


def version_tags(name: str, version: str, tracking_uri: str) -> dict[str, str]:
    return dict(MlflowClient(tracking_uri).get_model_version(name, version).tags or {})


def tag_version(name: str, version: str, tags: dict[str, str], tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def registry_overview(tracking_uri: str) -> list[dict]:
    """Every registered model version with aliases, lineage tags and last evaluation."""
    client = MlflowClient(tracking_uri)
    out = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name='{model.name}'"):
            tags = version.tags or {}
            out.append({"name": model.name, "version": str(version.version),
                        "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                        "stage": tags.get("stage", ""), "dataset": tags.get("dataset_id", ""),
                        "parent": tags.get("parent_model", ""), "eval": tags.get("eval.summary", ""),
                        "gate": tags.get("gate.decision", "")})
    return sorted(out, key=lambda r: (r["name"], -int(r["version"])))


def lineage(uri: str, tracking_uri: str) -> list[dict]:
    """A registered model and its parents (a fusion model's vision and language parents each), down to the
    dataset version and the URL list each was made from, or the Hugging Face checkpoint an imported model
    is: one dict per link, depth first, each with its `depth` (the model 0, its parents 1, ...)."""
    return _lineage(MlflowClient(tracking_uri), *resolve_version(uri, tracking_uri), 0)


def _lineage(client: MlflowClient, name: str, number: str, depth: int) -> list[dict]:
    version = client.get_model_version(name, number)
    tags = version.tags or {}
    links = [{"kind": "model", "name": f"models:/{name}/{number}", "stage": tags.get("stage", ""),
              "run_id": version.run_id, "dataset_id": tags.get("dataset_id", ""), "depth": depth}]
    if tags.get("source"):  # imported (hub.py): its lineage ends at the checkpoint it came from
        return links + [{"kind": "checkpoint", "name": tags["source"], "revision": tags.get("source_revision", ""),
                         "weights": ", ".join(f"{k.removeprefix('sha256.')} sha256 {v[:12]}"
                                              for k, v in sorted(tags.items()) if k.startswith("sha256.")),
                         "depth": depth + 1}]
    parents = []
    for key in ("parent_model", "lm_parent_model", "start_model", "captioner_model"):
        if tags.get(key):
            parent_name, _, parent_number = tags[key].partition("/")
            parents += _lineage(client, parent_name, parent_number, depth + 1)
    # The model's own dataset, unless a parent's branch already ends at it (a fusion model and its parents
    # trained on one dataset version); a model fine-tuned on another version shows both.
    shown = {link["name"] for link in parents if link["kind"] == "dataset"}
    if tags.get("dataset_id") and tags["dataset_id"] in shown:
        return links + parents
    with tempfile.TemporaryDirectory() as tmp:
        manifest = json.loads(Path(client.download_artifacts(version.run_id, "dataset/manifest.json", tmp)).read_text())
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    where = json.loads(inputs[0].dataset.source).get("uri", "") if inputs else ""
    filtered = manifest.get("filtered_from")  # a version filtered by a model's score (data/scored.py)
    return links + [{"kind": "dataset", "name": manifest["id"], "path": where, "rows": manifest["rows"]["kept"],
                     "splits": manifest["splits"], "depth": depth + 1},
                    *([{"kind": "filtered from dataset", "name": filtered["dataset_id"], "path": filtered["path"],
                        "by": filtered["by"],
                        "depth": depth + 2}] if filtered else []),
                    {"kind": "url list", "name": manifest["source"]["path"], "sha256": manifest["source"]["sha256"],
                     "depth": depth + 2 + bool(filtered)}] + parents
