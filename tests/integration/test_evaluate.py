"""Evaluation from the registry and the promotion gate, against a real MLflow registry on sqlite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmcore import registry, tracking
from mmcore.config import GateConfig, TrackingConfig
from mmcore.data.tokenizer import EOS, load_tokenizer
from mmcore.eval.gate import promote
from mmcore.eval.run import evaluate
from mmcore.eval.suites import get_suite
from mmcore.models import build_model, capabilities, model_config
from mmcore.bundle import ModelBundle
from mmcore.tracking import TrackingError

pytestmark = pytest.mark.integration


def _client(home):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


def test_evaluate_by_alias_in_a_fresh_process(trained, train_dataset, mmpipe_home):
    cli = Path(sys.executable).with_name("mmpipe")
    out = subprocess.run([str(cli), "evaluate", "models:/mmpipe-contrastive@candidate", "--dataset",
                          str(train_dataset.path)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MMPIPE_HOME=str(mmpipe_home), COLUMNS="150"))
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("zeroshot-shapes", "zeroshot-shapes-heldout", "zeroshot-digits", "zeroshot-digits-heldout",
                 "retrieval", "compositional"):
        assert name in out.stdout
    client = _client(mmpipe_home)
    version = client.get_model_version("mmpipe-contrastive", trained.model_version)
    run = client.get_run(version.tags["eval.run_id"])
    assert run.data.tags["mmpipe.model_version"] == trained.model_version and run.info.status == "FINISHED"
    metrics = run.data.metrics
    # The registry's copy scores exactly what the trained module scores in this process ...
    model, preprocess = ModelBundle.at(Path(trained.run_dir) / "final").load()
    expected = get_suite("retrieval", capabilities(model)).run(model, preprocess, train_dataset).metrics
    for key in ("image_to_text_recall_5", "text_to_image_recall_5", "image_to_text_recall_10"):
        # one row may flip on a near-tie: float sums run in another order in another process
        assert metrics[f"retrieval.{key}"] == pytest.approx(expected[key], abs=1.5 / metrics["retrieval.n"])
    # ... and that is a trained model: above chance (63 test rows, so only a loose bound is stable).
    directions = ("image_to_text", "text_to_image")
    both = sum(metrics[f"retrieval.{d}_recall_5"] for d in directions) / 2
    assert both > 1.5 * sum(metrics[f"retrieval.chance_{d}_recall_5"] for d in directions) / 2
    artifacts = {a.path for folder in ("zeroshot-shapes", "retrieval") for a in client.list_artifacts(run.info.run_id,
                                                                                                      folder)}
    assert {"zeroshot-shapes/confusion_matrix.png", "zeroshot-shapes/per_class.json",
            "retrieval/examples.png", "retrieval/recall.json"} <= artifacts
    assert "retrieval.image_to_text_recall_5=" in version.tags["eval.summary"]


def test_zeroshot_on_a_users_classes_file_from_the_command_line(trained, train_dataset, mmpipe_home, tmp_path):
    classes = tmp_path / "digits.json"
    classes.write_text(json.dumps({"column": "label", "classes": [str(d) for d in range(10)],
                                   "templates": ["a handwritten digit {}", "the number {}"]}))
    cli = Path(sys.executable).with_name("mmpipe")
    out = subprocess.run([str(cli), "evaluate", "models:/mmpipe-contrastive@candidate", "--dataset",
                          str(train_dataset.path), "--suite", "zeroshot", "--classes", str(classes)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MMPIPE_HOME=str(mmpipe_home), COLUMNS="150"))
    assert out.returncode == 0, out.stderr[-2000:]
    version = _client(mmpipe_home).get_model_version("mmpipe-contrastive", trained.model_version)
    metrics = _client(mmpipe_home).get_run(version.tags["eval.run_id"]).data.metrics
    digits = train_dataset.read("test", ["source"]).column("source").to_pylist().count("sklearn-digits")
    assert metrics["zeroshot.n"] == digits and metrics["zeroshot.chance"] == 0.1
    assert metrics["zeroshot.unlabelled"] + digits == train_dataset.manifest["splits"]["test"]
    # The gate compares on the user's classes too.
    _register(Path(trained.run_dir) / "final", "mmpipe-gate-classes", mmpipe_home)
    out = subprocess.run([str(cli), "promote", "mmpipe-gate-classes", "--dataset", str(train_dataset.path), "--suite",
                          "zeroshot", "--classes", str(classes), "--primary", "zeroshot.accuracy"],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, MMPIPE_HOME=str(mmpipe_home), COLUMNS="150"))
    assert out.returncode == 0 and "PROMOTED: mmpipe-gate-classes v1" in out.stdout, out.stdout + out.stderr[-2000:]
    gated = _client(mmpipe_home).get_model_version("mmpipe-gate-classes", "1")
    assert _client(mmpipe_home).get_run(gated.tags["eval.run_id"]).data.metrics["zeroshot.n"] == digits


def _register(bundle: Path, name: str, home: Path) -> str:
    uri = tracking.resolve_uri(TrackingConfig())
    client = _client(home)
    experiment = client.get_experiment_by_name("mmpipe") or client.get_experiment(client.create_experiment("mmpipe"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    return registry.log_and_register(uri, run_id, bundle, name, "candidate", {"stage": "contrastive"})


def _untrained_bundle(dataset, directory: Path) -> Path:
    tokenizer = load_tokenizer(dataset.tokenizer_path)
    config = model_config("clip-debug")
    model, pre = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
    ModelBundle.write(directory, model, config, dataset.tokenizer_path.read_text(), pre)
    return directory


def test_gate_promotes_better_models_and_refuses_worse(trained, train_dataset, mmpipe_home, tmp_path):
    name, data = "mmpipe-gate-test", str(train_dataset.path)
    client = _client(mmpipe_home)
    untrained = _untrained_bundle(train_dataset, tmp_path / "untrained")

    assert _register(untrained, name, mmpipe_home) == "1"
    first = promote(name, data)
    assert first.promoted and "no 'champion' yet" in first.reason

    assert _register(Path(trained.run_dir) / "final", name, mmpipe_home) == "2"
    second = promote(name, data)
    assert second.promoted, second.reason
    assert second.candidate.metric("retrieval.image_to_text_recall_5") > second.champion.metric(
        "retrieval.image_to_text_recall_5")
    assert client.get_model_version_by_alias(name, "champion").version in ("2", 2)
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == "1"

    assert _register(untrained, name, mmpipe_home) == "3"
    third = promote(name, data)
    assert not third.promoted and "not better" in third.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version(name, "3").tags["gate.decision"] == "refused"


def test_gate_never_moves_an_alias_on_a_partial_evaluation(trained, train_dataset, mmpipe_home, tmp_path):
    name = "mmpipe-gate-partial"
    _register(Path(trained.run_dir) / "final", name, mmpipe_home)
    lost = _copy_with_manifest(train_dataset, tmp_path / "no-test-split",  # as if the test shards were lost
                               lambda m: m.update(shards=[s for s in m["shards"] if s["split"] != "test"]))
    decision = promote(name, lost)
    assert not decision.promoted and "candidate evaluation failed" in decision.reason
    assert "retrieval" in decision.candidate.errors and "zeroshot-shapes" in decision.candidate.errors
    assert registry.alias_version(name, "champion", tracking.resolve_uri(TrackingConfig())) is None

    # A dataset without the sample corpus's columns (web pairs): its suites do not apply, which is no failure;
    # the stage's primary suite (retrieval) runs and the gate decides on it.
    web = _copy_with_manifest(train_dataset, tmp_path / "no-labels", lambda m: m["source"].update(extras=[]))
    decision = promote(name, web)
    assert decision.candidate.ok and "retrieval" in decision.candidate.metrics, decision.candidate.errors
    assert "sample corpus" in decision.candidate.not_applicable["zeroshot-shapes"]
    assert set(decision.candidate.not_applicable) == {"zeroshot-shapes", "zeroshot-shapes-heldout", "zeroshot-digits",
                                                      "zeroshot-digits-heldout", "compositional", "zeroshot"}
    assert decision.candidate.not_applicable["zeroshot"] == \
        "it needs --classes (mmpipe evaluate or promote; the flows' gate: classes)"
    assert decision.promoted, decision.reason


def _copy_with_manifest(dataset, path: Path, change) -> str:
    """A copy of `dataset` at `path` whose manifest `change` edited in place."""
    shutil.copytree(dataset.path, path)
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return str(path)


def test_registry_errors_are_clear(trained, train_dataset, mmpipe_home):
    data = str(train_dataset.path)
    with pytest.raises(ValueError, match="no registered model named 'nope'"):
        evaluate("models:/nope@candidate", data)
    with pytest.raises(ValueError, match="has no alias 'gold'"):
        evaluate("models:/mmpipe-contrastive@gold", data)
    with pytest.raises(ValueError, match="has no version 99"):
        evaluate("models:/mmpipe-contrastive/99", data)
    with pytest.raises(ValueError, match="not a registry URI"):
        evaluate("runs:/abc/model", data)
    with pytest.raises(TrackingError, match="not reachable"):
        evaluate("models:/mmpipe-contrastive@candidate", data, tracking_cfg=TrackingConfig(uri="http://127.0.0.1:9"))
    with pytest.raises(ValueError, match="gate.margin"):
        promote("mmpipe-contrastive", data, GateConfig(margin=-1))
