"""The image tokenizer stage for real: DeepSpeed ZeRO-2 in this process, MLflow on sqlite, evaluation
from the registry and the pyfunc in a fresh process."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenized(image_tokenizer):
    return image_tokenizer


def _history(run_id: str, key: str, mmpipe_home) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_the_image_tokenizer_learns_to_reconstruct_and_is_registered(tokenized, mmpipe_home):
    from mlflow.tracking import MlflowClient

    losses, psnrs = _history(tokenized.mlflow_run_id, "loss", mmpipe_home), _history(tokenized.mlflow_run_id, "psnr",
                                                                                      mmpipe_home)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert psnrs[-1] > psnrs[0] + 5, psnrs
    assert tokenized.model_name == "mmpipe-image-tokenizer" and tokenized.metrics["bad_steps"] == 0
    version = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}").get_model_version_by_alias(
        "mmpipe-image-tokenizer", "candidate")
    assert str(version.version) == tokenized.model_version
    assert version.tags["stage"] == "image-tokenizer" and version.tags["dataset_id"] == tokenized.dataset_id


def test_evaluation_reports_psnr_codebook_use_and_a_grid(tokenized, train_dataset, mmpipe_home):
    from mlflow.tracking import MlflowClient

    from mmcore.eval.run import evaluate

    report = evaluate("models:/mmpipe-image-tokenizer@candidate", str(train_dataset.path))
    assert report.ok and list(report.metrics) == ["reconstruction"], report.errors
    metrics = report.metrics["reconstruction"]
    # An untrained debug tokenizer reconstructs at about 10 dB; 300 steps reach about 18.
    assert metrics["psnr"] > 15 and metrics["psnr_synthetic"] > 15, metrics
    assert metrics["codebook_usage"] > 0.5 and metrics["tokens_per_image"] == 16
    client = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(report.mlflow_run_id, "reconstruction")}
    assert "reconstruction/reconstructions_synthetic.png" in logged


def test_a_fresh_process_tokenizes_images_through_the_pyfunc_by_alias(tokenized, train_dataset, mmpipe_home):
    from mmcore.registry import load_model

    blobs = [r["image"] for r in train_dataset.read("test", columns=["image"]).to_pylist()[:3]]
    code = ("import sys, mlflow, pandas as pd, numpy as np; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/mmpipe-image-tokenizer@candidate'); "
            "frame = pd.DataFrame({'image': [open(p, 'rb').read() for p in sys.argv[2:]]}); "
            "np.save(sys.stdout.buffer, np.asarray(m.predict(frame)))")
    paths = []
    for i, blob in enumerate(blobs):
        path = mmpipe_home / f"tokenize-{i}.jpg"
        path.write_bytes(blob)
        paths.append(str(path))
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{mmpipe_home / 'mlflow.db'}", *paths],
                         capture_output=True, timeout=300, check=True)
    codes = np.load(io.BytesIO(out.stdout))
    model, preprocess = load_model(tokenized.model_uri, f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    expected = model.encode(torch.from_numpy(preprocess.images(blobs))).numpy()
    assert codes.shape == (3, 16) and codes.dtype == np.int64 and np.array_equal(codes, expected)
