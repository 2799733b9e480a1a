"""The one MLflow-aware module: runs, dataset lineage, metrics, logging/registering/loading models.

A registered model is an MLflow pyfunc (loaded from code, no pickle) whose artifacts are
  weights.safetensors, model.json (architecture, vocab), tokenizer.json, preprocess.json.
`load_model("models:/name@alias")` returns the native nn.Module; `mlflow.pyfunc.load_model`
works in any client that has mmcore installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from mmcore.config import TrackingConfig, project_home
from mmcore.data.tokenizer import EOS, load_tokenizer
from mmcore.models import build_model, capabilities
from mmcore.models.preprocess import PreprocessConfig, Preprocessor
from mmcore.pause import pause_point
from mmcore.redact import redact

PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")


class TrackingError(RuntimeError):
    """MLflow cannot be reached or refused a request."""


def resolve_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI (a server, e.g. from `mmpipe up`), else the project's sqlite."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail fast, before any worker starts, when the tracking server does not answer."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quick_http():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unreachable server
        raise TrackingError(f"MLflow at {uri} is not reachable: {str(err).splitlines()[0][:300]}") from None


@contextlib.contextmanager
def _quick_http():
    """Fewer retries and a short timeout for the reachability probe."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the working directory
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def create_run(uri: str, cfg: TrackingConfig, run_name: str, dataset) -> str:
    """A new MLflow run for a training run; returns its id (keep it at once: see start_run)."""
    client = MlflowClient(uri)
    run = client.create_run(_experiment_id(client, cfg.experiment, uri), run_name=run_name,
                            tags={"mmpipe.git_commit": git_commit(), "mmpipe.dataset_id": dataset.id})
    return run.info.run_id


def start_run(uri: str, run_id: str, params: dict, dataset) -> None:
    """Mark the run RUNNING; the first time (no params yet, also after a kill right after create_run),
    log its params and dataset lineage.

    The run stays RUNNING until `end_run`: MLflow's system-metrics monitor stops at any other status.
    """
    client = MlflowClient(uri)
    if not client.get_run(run_id).data.params:
        client.log_batch(run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items()])
        client.log_text(run_id, json.dumps(dataset.manifest, indent=2), "dataset/manifest.json")
        with warnings.catch_warnings():  # MLflow registers two identical local sources (schemes "" and "file")
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(str(dataset.path))
        meta = MetaDataset(source, name=f"mmpipe-{dataset.id}", digest=dataset.id)
        client.log_inputs(run_id, datasets=[DatasetInput(meta._to_mlflow_entity(),
                                                         tags=[InputTag("mlflow.data.context", "training")])])
    client.update_run(run_id, status="RUNNING")


def end_run(uri: str, run_id: str, ok: bool) -> None:
    MlflowClient(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


@contextlib.contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API (start_run, log_model, download_artifacts, system metrics) reads one
    process-wide URI, and set_tracking_uri also exports it as $MLFLOW_TRACKING_URI, which resolve_uri
    reads: both are put back after the block, so one run's URI never becomes a later run's default."""
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str):
    """CPU/GPU/memory sampled into the run while the block runs (MLflow's system metrics monitor)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with fluent_uri(uri):
        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()


class MetricLogger:
    """Rank 0's metric writer. Training never waits for the server: points it does not take are
    kept, in order with their original time and step, and sent with later ones, retried with
    backoff (1 s doubling to 60 s); `close` waits for it to take the rest.

    `unsent()` goes into each checkpoint and `kept` takes it back on resume, so points kept while the
    server was down outlive a rank 0 that dies; MLflow stores a point sent twice (same key, value,
    time and step) once."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch
    FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0

    def __init__(self, uri: str, run_id: str, kept: list[list] = ()):
        self.client, self.run_id = MlflowClient(uri), run_id
        self.pending: list[Metric] = [Metric(key, value, timestamp, step) for key, value, timestamp, step in kept]
        self.failures, self.last_error = 0, ""
        self.retry_at, self.backoff = 0.0, self.FIRST_BACKOFF_S

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() >= self.retry_at:
            self._flush(step)

    def _flush(self, step: int | None = None) -> bool:
        try:
            with _quick_http():
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[: self.BATCH])
                    del self.pending[: self.BATCH]
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unreachable server
            self.failures += 1
            self.last_error = str(err).splitlines()[0][:300]
            self.retry_at = time.monotonic() + self.backoff
            print(f"mmpipe: warning: MLflow did not take the metrics{'' if step is None else f' of step {step}'} "
                  f"({len(self.pending)} points kept, retry in {self.backoff:.0f} s): {self.last_error}", flush=True)
            self.backoff = min(2 * self.backoff, self.MAX_BACKOFF_S)
            return False
        self.backoff = self.FIRST_BACKOFF_S
        return True

    def unsent(self) -> list[list]:
        """The points the server has not taken yet, as plain data (for a checkpoint's manifest)."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self.pending]

    def close(self, wait_s: float) -> int:
        """Wait up to `wait_s` for the server to take the points still kept; returns how many it never took."""
        deadline = time.monotonic() + wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self.retry_at, deadline) - time.monotonic()))
            self._flush()
        if self.pending:
            print(f"mmpipe: warning: MLflow did not answer for {wait_s:.0f} s: {len(self.pending)} metric points "
                  f"of run {self.run_id} are lost ({self.last_error})", flush=True)
        return len(self.pending)


def wait_until_reachable(uri: str, wait_s: float, what: str) -> None:
    """Poll the server until it answers, at most `wait_s`; then a TrackingError that says what waited."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_reachable(uri)
        except TrackingError as err:
            if time.monotonic() >= deadline:
                raise TrackingError(f"{err} (waited {wait_s:.0f} s to {what})") from None
            time.sleep(2.0)


@dataclass
class ModelBundle:
    """A registered model's files, as written by the trainer and read back by load_model."""

    weights: str
    config: str
    tokenizer: str
    preprocess: str

    @classmethod
    def write(cls, directory: Path, model: torch.nn.Module, config: dict, tokenizer_json: str,
              preprocess: PreprocessConfig) -> "ModelBundle":
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, directory / "weights.safetensors")
        (directory / "model.json").write_text(json.dumps(config, indent=2))
        (directory / "tokenizer.json").write_text(tokenizer_json)
        (directory / "preprocess.json").write_text(json.dumps(asdict(preprocess), indent=2))
        return cls.at(directory)

    @classmethod
    def at(cls, directory: Path) -> "ModelBundle":
        d = Path(directory)
        return cls(str(d / "weights.safetensors"), str(d / "model.json"), str(d / "tokenizer.json"),
                   str(d / "preprocess.json"))

    def load(self) -> tuple[torch.nn.Module, Preprocessor]:
        tokenizer = load_tokenizer(self.tokenizer)
        config = json.loads(Path(self.config).read_text())
        model, _ = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
        model.load_state_dict(load_file(self.weights))
        preprocess = PreprocessConfig(**json.loads(Path(self.preprocess).read_text()))
        return model.eval(), Preprocessor(preprocess, Path(self.tokenizer).read_text())


class PyfuncModel(mlflow.pyfunc.PythonModel):
    """A contrastive model: predict(DataFrame with an `image` (bytes) or a `text` per row) -> (N, E)
    embeddings. A model that generates (fusion): predict(DataFrame with `image` and `prompt`) -> answers.
    An image tokenizer: predict(DataFrame with `image`) -> (N, tokens) codes. A model that draws
    (unified), with params {"output": "image"}: predict(DataFrame with `prompt`) -> PNG bytes."""

    def load_context(self, context):
        _check_bundle_files(Path(context.artifacts["weights"]).parent, "this model")
        self.model, self.preprocess = ModelBundle(**context.artifacts).load()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        can = capabilities(self.model)
        if "generate_image" in can and (params or {}).get("output", "text") == "image":
            return draw_rows(self.model, self.preprocess, model_input, params or {})
        if "generate" in can:
            return answer_rows(self.model, self.preprocess, model_input, params or {})
        if "tokenize_image" in can:
            return tokenize_rows(self.model, self.preprocess, model_input)
        return embed_rows(self.model, self.preprocess, model_input)


GENERATION_PARAMS = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0}
DRAWING_PARAMS = {"output": "text", "image_temperature": 1.0, "top_k": 0, "guidance": 3.0, "seed": 0}
"""A model that draws: output "image" returns PNG bytes per prompt, sampled with these settings."""


def draw_rows(model, preprocess: Preprocessor, rows: pd.DataFrame, params: dict) -> list[bytes]:
    """A PNG of the image drawn for each row's `prompt`; a row without one, or with a prompt too long,
    is a ValueError naming the row."""
    from PIL import Image

    from mmcore.data.sample import png_bytes
    from mmcore.models.encode import draw_images

    prompts = rows["prompt"].tolist() if "prompt" in rows else [None] * len(rows)
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"row {row}: each row needs a `prompt` (text) to draw")
    settings = {**DRAWING_PARAMS, **{k: v for k, v in params.items() if k in DRAWING_PARAMS}}
    images = draw_images(model, preprocess, prompts, temperature=float(settings["image_temperature"]),
                         top_k=int(settings["top_k"]), guidance=float(settings["guidance"]), seed=int(settings["seed"]))
    return [png_bytes(Image.fromarray(image)) for image in images]


def answer_rows(model, preprocess: Preprocessor, rows: pd.DataFrame, params: dict) -> list[str]:
    """The answer to each row's `prompt` about its `image` (encoded bytes), generated in batches;
    a row without them, with an undecodable image or a prompt too long is a ValueError naming the row."""
    from mmcore.models.encode import generate_answers

    images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
    prompts = rows["prompt"].tolist() if "prompt" in rows else [None] * len(rows)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, (bytes, bytearray)) or not isinstance(prompt, str):
            raise ValueError(f"row {row}: each row needs an `image` (encoded bytes) and a `prompt` (text)")
    blobs = [bytes(image) for image in images]
    _say_resized(preprocess, blobs, list(range(len(blobs))))
    settings = {**GENERATION_PARAMS, **{k: v for k, v in params.items() if k in GENERATION_PARAMS}}
    try:
        return generate_answers(model, preprocess, blobs, prompts, max_new_tokens=int(settings["max_new_tokens"]),
                                temperature=float(settings["temperature"]), top_p=float(settings["top_p"]))
    except (OSError, ValueError) as err:
        if str(err).startswith("row "):
            raise
        raise ValueError(f"row {_undecodable(preprocess, blobs)}: the image cannot be decoded ({err})") from err


def tokenize_rows(model, preprocess: Preprocessor, rows: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
    """Each row's `image` (encoded bytes) as (N, tokens) int64 codes, in batches; a row without an
    image, or with one that does not decode, is a ValueError naming the row."""
    images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
    for row, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise ValueError(f"row {row}: each row needs an `image` (encoded bytes)")
    blobs = [bytes(image) for image in images]
    _say_resized(preprocess, blobs, list(range(len(blobs))))
    out = np.zeros((len(rows), model.grid ** 2), np.int64)
    with torch.no_grad():
        for start in range(0, len(blobs), batch_size):
            chunk = blobs[start: start + batch_size]
            try:
                pixels = preprocess.images(chunk)
            except (OSError, ValueError) as err:
                raise ValueError(f"row {start + _undecodable(preprocess, chunk)}: the image cannot be decoded "
                                 f"({err})") from err
            out[start: start + len(chunk)] = model.encode(torch.from_numpy(pixels)).numpy()
    return out


def embed_rows(model, preprocess: Preprocessor, rows: pd.DataFrame) -> np.ndarray:
    """One embedding per row, in row order: of its `image` (encoded bytes) if it has one, else of its `text`.

    The images and the texts are each embedded in batches; a row with neither, or with an image
    that does not decode, is a ValueError naming the row.
    """
    from mmcore.models.encode import embed_images, embed_texts

    images = rows["image"].tolist() if "image" in rows else [None] * len(rows)
    texts = rows["text"].tolist() if "text" in rows else [None] * len(rows)
    image_rows = [i for i, image in enumerate(images) if isinstance(image, (bytes, bytearray))]
    text_rows = [i for i, (image, text) in enumerate(zip(images, texts))
                 if not isinstance(image, (bytes, bytearray)) and isinstance(text, str)]
    if len(image_rows) + len(text_rows) < len(rows):
        first = sorted(set(range(len(rows))) - set(image_rows) - set(text_rows))[0]
        raise ValueError(f"row {first}: each row needs an `image` (encoded bytes) or a `text` value")
    out = np.zeros((len(rows), model.cfg.embed_dim), np.float32)
    if image_rows:
        blobs = [bytes(images[i]) for i in image_rows]
        _say_resized(preprocess, blobs, image_rows)
        try:
            out[image_rows] = embed_images(model, preprocess, blobs)
        except (OSError, ValueError) as err:  # PIL's errors do not say which image: find the row
            raise ValueError(f"row {image_rows[_undecodable(preprocess, blobs)]}: the image cannot be decoded "
                             f"({err})") from err
    if text_rows:
        out[text_rows] = embed_texts(model, preprocess, [texts[i] for i in text_rows])
    return out


def _say_resized(preprocess: Preprocessor, blobs: list[bytes], rows: list[int]) -> None:
    """Warn, naming the rows (`rows[i]` is blob i's), when images are not the model's size: the
    preprocessing resizes them to image_size x image_size, which changes what the model sees."""
    import io

    from PIL import Image

    size, odd = preprocess.cfg.image_size, {}
    for row, blob in zip(rows, blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:  # reads the header only
                if image.size != (size, size):
                    odd[row] = image.size
        except OSError:
            continue  # an undecodable image is an error, named when it is decoded
    if odd:
        shown = ", ".join(f"{row} ({w}x{h})" for row, (w, h) in list(odd.items())[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        warnings.warn(f"rows {shown}{more}: images resized to {size}x{size} pixels, the model's "
                      f"preprocessing image_size", stacklevel=3)


def _undecodable(preprocess: Preprocessor, blobs: list[bytes]) -> int:
    for index, blob in enumerate(blobs):
        try:
            preprocess.image(blob)
        except (OSError, ValueError):
            return index
    raise AssertionError("a batch that failed to decode decodes row by row")


def _signature(model):
    """Contrastive: per row an `image` (encoded bytes) or a `text` -> (N, embed_dim) float32 embeddings.
    Generative: per row an `image` and a `prompt` -> answers; generation settings as params. A model
    that also draws: the image is optional, and output="image" returns PNG bytes.
    Image tokenizer: per row an `image` -> (N, tokens) int64 codes."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    can = capabilities(model)
    if "generate" in can:
        draws = "generate_image" in can  # then the image is optional (a prompt to draw) and the output text or PNG
        kinds = {str: "string", int: "long", float: "double"}
        settings = {**GENERATION_PARAMS, **(DRAWING_PARAMS if draws else {})}
        params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in settings.items()])
        inputs = Schema([ColSpec("binary", "image", required=not draws), ColSpec("string", "prompt")])
        return ModelSignature(inputs=inputs, outputs=None if draws else Schema([ColSpec("string")]), params=params)
    if "tokenize_image" in can:
        return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                              outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, model.grid ** 2))]))
    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "text", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.cfg.embed_dim))]))


def pyfunc_requirements() -> list[str]:
    """What a client needs to load the pyfunc: mmpipe (its code is the model's; it brings torch and the
    rest) and this MLflow. Stated, not inferred: MLflow's inference loads the model in a subprocess
    (about 8 s of every registration on 2 cores) and also listed cloudpickle and scipy, which it
    does not use."""
    from importlib.metadata import version

    return [f"mmpipe=={version('mmpipe')}", f"mlflow=={mlflow.__version__}"]


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
    model, _ = bundle.load()
    signature = _signature(model)
    with fluent_uri(uri):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE), artifacts=asdict(bundle),
                                           signature=signature, input_example=None,
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
    _check_bundle_files(directory, uri)
    return ModelBundle.at(directory)


def _check_bundle_files(directory: Path, uri: str) -> None:
    expected = {Path(path).name for path in asdict(ModelBundle.at(directory)).values()}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory)
        if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
            raise TrackingError(f"refusing {uri}: its file {name} is a link ({path.resolve()}); a model's files "
                                "must lie in its own directory")
        if str(name) not in expected:
            raise TrackingError(f"refusing {uri}: it holds {name}, which is not one of its bundle's files "
                                f"({', '.join(sorted(expected))}); mmpipe loads safetensors and JSON only, never "
                                "a pickle")
    missing = sorted(expected - {p.name for p in directory.iterdir()})
    if missing:
        raise TrackingError(f"cannot load {uri}: its files lack {', '.join(missing)}")


def load_model(uri: str, tracking_uri: str | None = None) -> tuple[torch.nn.Module, Preprocessor]:
    """models:/name@alias (or /version) -> (native module in eval mode, its preprocessor)."""
    return model_files(uri, tracking_uri).load()


# ----- registry queries and evaluation records (used by mmcore.eval) -----

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
        with _quick_http():
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


def log_evaluation(tracking_uri: str, experiment: str, name: str, version: str, dataset, results: dict) -> str:
    """One MLflow run per evaluation: metrics per suite, a table per suite, figures; linked to the version."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(_experiment_id(client, experiment, tracking_uri), run_name=f"eval-{name}-v{version}",
                            tags={"mmpipe.model_name": name, "mmpipe.model_version": version,
                                  "mmpipe.dataset_id": dataset.id, "mmpipe.kind": "evaluation"})
    run_id = run.info.run_id
    client.log_param(run_id, "model_uri", f"models:/{name}/{version}")
    client.log_param(run_id, "dataset", str(dataset.path))
    for suite_name, outcome in results.items():
        if outcome.get("error"):
            client.set_tag(run_id, f"suite.{suite_name}.error", outcome["error"][:5000])
            continue
        result = outcome["result"]
        for key, value in result.metrics.items():
            client.log_metric(run_id, f"{suite_name}.{key}", float(value))
        for table_name, frame in result.tables.items():
            client.log_table(run_id, data=frame, artifact_file=f"{suite_name}/{table_name}.json")
        for file_name, png in result.figures.items():
            _log_bytes(client, run_id, png, f"{suite_name}/{file_name}")
    ok = all(not outcome.get("error") for outcome in results.values())
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
    return run_id


def _log_bytes(client: MlflowClient, run_id: str, data: bytes, artifact_path: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_path).name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), str(Path(artifact_path).parent))


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
    """A registered model and its parents, down to the dataset version and the URL list it was made from:
    one dict per link, the model first."""
    client = MlflowClient(tracking_uri)
    chain, name, number = [], *resolve_version(uri, tracking_uri)
    while True:
        version = client.get_model_version(name, number)
        tags = version.tags or {}
        chain.append({"kind": "model", "name": f"models:/{name}/{number}", "stage": tags.get("stage", ""),
                      "run_id": version.run_id, "dataset_id": tags.get("dataset_id", "")})
        parent = tags.get("parent_model")
        if not parent:
            break
        name, _, number = parent.partition("/")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = json.loads(Path(client.download_artifacts(version.run_id, "dataset/manifest.json", tmp)).read_text())
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    where = json.loads(inputs[0].dataset.source).get("uri", "") if inputs else ""
    chain.append({"kind": "dataset", "name": manifest["id"], "path": where,
                  "rows": manifest["rows"]["kept"], "splits": manifest["splits"]})
    chain.append({"kind": "url list", "name": manifest["source"]["path"], "sha256": manifest["source"]["sha256"]})
    return chain


def ui_links(tracking_uri: str, run_id: str | None = None, model: tuple[str, str] | None = None) -> dict[str, str]:
    """Where to look in the MLflow UI: links for a server, the command that opens a local store otherwise."""
    if not tracking_uri.startswith(("http://", "https://")):
        return {"MLflow UI": f"`mlflow ui --backend-store-uri {tracking_uri}`"}
    base, links = tracking_uri.rstrip("/"), {}
    if run_id:
        experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        links["MLflow run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    if model:
        links["model version"] = f"{base}/#/models/{model[0]}/versions/{model[1]}"
    return links
