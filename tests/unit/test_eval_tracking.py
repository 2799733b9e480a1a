"""Retrieval recall on constructed embeddings; metric logging that survives a dead tracking server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mmcore.eval.retrieval import retrieval_recall
from mmcore.tracking import MetricLogger, TrackingError, check_reachable


def test_perfect_and_reversed_retrieval():
    captions = [f"caption {i}" for i in range(20)]
    emb = np.eye(20, dtype=np.float32)
    perfect = retrieval_recall(emb, emb, captions)
    assert perfect["image_to_text_recall_1"] == 1.0 and perfect["text_to_image_recall_1"] == 1.0
    assert perfect["chance_image_to_text_recall_1"] == pytest.approx(1 / 20)
    assert perfect["chance_text_to_image_recall_5"] == pytest.approx(5 / 20)
    shifted = retrieval_recall(emb, np.roll(emb, 1, axis=0), captions)
    assert shifted["image_to_text_recall_1"] == 0.0


def test_repeated_captions_count_as_right():
    """Two images share the caption 'a red circle': retrieving either caption copy is right."""
    captions = ["a red circle", "a red circle", "a blue square"]
    images = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    texts = np.array([[1, 0.1], [1, 0], [0, 1]], dtype=np.float32)
    scores = retrieval_recall(images, texts, captions, ks=(1,))
    assert scores["image_to_text_recall_1"] == 1.0
    assert scores["chance_image_to_text_recall_1"] == pytest.approx(1 / 2)  # two distinct captions
    assert scores["chance_text_to_image_recall_1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)


def test_copies_of_one_caption_do_not_fill_the_top_k():
    """Six images say "a red circle", one "a blue square"; the square's image scores its own caption second:
    found at k=2, where counting the six copies apart would push it to rank 7."""
    captions = ["a red circle"] * 6 + ["a blue square"]
    texts = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]], dtype=np.float32)
    images = np.array([[1.0, 0.0]] * 6 + [[0.8, 0.6]], dtype=np.float32)
    scores = retrieval_recall(images, texts, captions, ks=(1, 2))
    assert scores["image_to_text_recall_1"] == pytest.approx(6 / 7)
    assert scores["image_to_text_recall_2"] == 1.0


def test_metric_points_a_server_does_not_take_are_kept_and_retried_with_backoff(capsys):
    logger = MetricLogger("http://127.0.0.1:9", "no-such-run")
    logger.log({"loss": 1.0}, step=1)
    logger.log({"loss": 0.9}, step=2)  # within the first backoff: kept, not sent
    assert logger.failures == 1 and logger.last_error
    assert [(m.step, m.value) for m in logger.pending] == [(1, 1.0), (2, 0.9)]
    assert "MLflow did not take the metrics of step 1 (1 points kept, retry in 1 s)" in capsys.readouterr().out
    assert logger.close(wait_s=3.5) == 2  # retried after 1 s, 2 s more, and once at the deadline
    assert logger.failures == 4
    assert "2 metric points of run no-such-run are lost" in capsys.readouterr().out


def test_unreachable_tracking_server_is_a_clear_error():
    with pytest.raises(TrackingError, match="MLflow at http://127.0.0.1:9 is not reachable"):
        check_reachable("http://127.0.0.1:9")


@pytest.mark.parametrize(("text", "shown"), [
    ("MLflow at http://admin:hunter2@10.0.0.5:5000 is down", "MLflow at http://admin:***@10.0.0.5:5000 is down"),
    ("git clone https://ghp_tok3n@github.com/a/b", "git clone https://***@github.com/a/b"),
    ("GET https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential=AKIA1&X-Amz-Signature=9f&size=2",
     "GET https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential=***&X-Amz-Signature=***&size=2"),
    ("https://h/x?access_token=abc&author=me&design=1", "https://h/x?access_token=***&author=me&design=1"),
    ("s3://bucket/runs and ray://10.0.0.5:10001 and a@b.c", "s3://bucket/runs and ray://10.0.0.5:10001 and a@b.c"),
])
def test_secrets_in_text_are_masked_and_other_text_is_not(text, shown):
    from mmcore.redact import redact

    assert redact(text) == shown


def test_a_secret_from_the_environment_is_masked_in_log_files_and_the_error_line(tmp_path, monkeypatch):
    import logging

    from mmcore import console
    from mmcore.redact import RedactingFormatter

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))  # a path, not a secret: shown
    log_path = tmp_path / "run.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("test-redact")
    logger.addHandler(handler)
    try:
        logger.warning("signing with %s for %s", "wJalrXUtnFEMI-K7MDENG", tmp_path / "token")
        try:
            raise ValueError("endpoint http://u:wJalrXUtnFEMI-K7MDENG@127.0.0.1:9 refused")
        except ValueError as err:
            logger.exception("failed")
            line = console.failure(err, "ingest")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = log_path.read_text()
    assert "wJalrXUtnFEMI" not in text and "wJalrXUtnFEMI" not in line
    assert f"signing with *** for {tmp_path / 'token'}" in text and "http://u:***@127.0.0.1:9" in line


def _debug_clip():
    from mmcore.data.config import TokenizerConfig
    from mmcore.data.tokenizer import EOS, train_tokenizer
    from mmcore.models import build_model, model_config
    from mmcore.models.preprocess import Preprocessor

    tokenizer = train_tokenizer(["a red circle", "two blue squares left of a green triangle"] * 20,
                                TokenizerConfig(vocab_size=300))
    model, pre = build_model(model_config("clip-debug"), vocab_size=tokenizer.get_vocab_size(),
                             eos_id=tokenizer.token_to_id(EOS))
    return model.eval(), Preprocessor(pre, tokenizer.to_str())


def _jpeg(color) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buffer, "JPEG")
    return buffer.getvalue()


def test_registry_embeddings_come_in_batches_equal_to_row_by_row():
    import pandas as pd

    from mmcore.pyfunc import embed_rows

    model, pre = _debug_clip()
    rows = pd.DataFrame({"image": [_jpeg((200, 0, 0)), None, _jpeg((0, 0, 200)), None, _jpeg((0, 150, 0))],
                         "text": [None, "a red circle", None, "two blue squares", "ignored: the row has an image"]})
    batched = embed_rows(model, pre, rows)
    one_by_one = np.concatenate([embed_rows(model, pre, rows.iloc[[i]]) for i in range(len(rows))])
    assert batched.shape == (5, model.cfg.embed_dim) and batched.dtype == np.float32
    assert np.allclose(batched, one_by_one, atol=1e-5)
    assert not np.allclose(batched[0], batched[2]), "rows keep their own embedding, in order"


def test_registry_embeddings_name_the_bad_row():
    import pandas as pd

    from mmcore.pyfunc import embed_rows

    model, pre = _debug_clip()
    with pytest.raises(ValueError, match="row 2: the image cannot be decoded"):
        embed_rows(model, pre, pd.DataFrame({"image": [_jpeg((1, 2, 3)), _jpeg((4, 5, 6)), b"not an image"]}))
    with pytest.raises(ValueError, match="row 1: each row needs an `image`"):
        embed_rows(model, pre, pd.DataFrame({"text": ["a red circle", None]}))


def test_the_stages_side_by_side_share_only_the_suites_two_of_them_ran():
    from mmcore.eval.run import EvalReport, side_by_side
    from pipelines.report import stages_markdown

    clip = EvalReport("mmpipe-contrastive", "3", "d1", "r1", metrics={
        "compositional": {"accuracy": 0.61, "chance": 0.5, "n": 444.0}, "zeroshot-shapes": {"accuracy": 0.8}})
    fusion = EvalReport("mmpipe-fusion", "2", "d1", "r2", metrics={
        "compositional": {"accuracy": 0.52, "chance": 0.5, "n": 444.0},
        "vqa": {"accuracy": 0.68, "digit_accuracy": 0.88, "n": 3334.0}})
    tokenizer = EvalReport("mmpipe-image-tokenizer", "1", "d1", "r3", metrics={"reconstruction": {"psnr": 27.1}})
    unified = EvalReport("mmpipe-unified", "1", "d1", "r4", metrics={
        "compositional": {"accuracy": 0.53, "chance": 0.5, "n": 444.0}, "vqa": {"accuracy": 0.42},
        "text-to-image": {"pixel_color_accuracy": 0.3}})
    markdown = stages_markdown([clip, fusion, tokenizer, unified])
    header, *rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    # Compositional for the three stages, VQA accuracy for two; a suite or metric one model has is left
    # out, and so is a model that shares none (the tokenizer).
    assert header == "| suite | metric | mmpipe-contrastive v3 | mmpipe-fusion v2 | mmpipe-unified v1 |"
    assert rows == ["| compositional | accuracy | 0.6100 | 0.5200 | 0.5300 |",
                    "| vqa | accuracy | - | 0.6800 | 0.4200 |"]
    assert "share no evaluation suite" in stages_markdown([tokenizer, clip])
    for report in (clip, fusion, unified):  # the console's table: each shared suite's primary metric
        report.primaries = {"compositional": "accuracy", "vqa": "accuracy"}
    fusion.metrics["compositional"]["swap_accuracy"] = unified.metrics["compositional"]["swap_accuracy"] = 0.5
    assert [row[:2] for row in side_by_side([clip, fusion, unified], primary_only=True)[1]] == [
        ("compositional", "accuracy"), ("vqa", "accuracy")]
    assert ("compositional", "swap_accuracy") in [row[:2] for row in side_by_side([clip, fusion, unified])[1]]


@pytest.mark.fault
def test_a_model_version_holding_a_pickle_or_a_link_out_of_its_files_is_refused(tmp_path, fault):
    """Loading from the registry runs no code: only safetensors and JSON are read, and a version whose
    files hold anything else (a pickle) or a link out of their directory is refused, naming the file."""
    import pickle
    import shutil
    from dataclasses import asdict

    import mlflow
    from mlflow.tracking import MlflowClient

    from mmcore.models import model_config
    from mmcore.bundle import BundleError, ModelBundle
    from mmcore.tracking import fluent_uri
    from mmcore.registry import PYFUNC_CODE, load_model, log_and_register, model_files

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", artifact_location=str(tmp_path / "artifacts"))
    model, pre = _debug_clip()
    bundle = ModelBundle.write(tmp_path / "bundle", model, model_config("clip-debug"), pre.tokenizer.to_str(), pre.cfg)
    run = client.create_run(experiment)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    version = log_and_register(uri, run.info.run_id, tmp_path / "bundle", "safe", "candidate", {})
    loaded, _ = load_model(f"models:/safe/{version}", uri)
    assert type(loaded) is type(model)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "one call's URI must not become the default"

    # A version whose files hold a pickle (logged beside the bundle's own files).
    (tmp_path / "extra.pkl").write_bytes(pickle.dumps({"anything": 1}))
    with fluent_uri(uri):
        with mlflow.start_run(run_id=client.create_run(experiment).info.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                           artifacts={**asdict(bundle), "extra": str(tmp_path / "extra.pkl")})
        hostile = mlflow.register_model(info.model_uri, "hostile").version
        with pytest.raises(BundleError, match=r"refusing this model: it holds extra\.pkl"):  # MLflow's own loader
            mlflow.pyfunc.load_model(f"models:/hostile/{hostile}")
    with pytest.raises(BundleError, match=r"refusing models:/hostile/1: it holds extra\.pkl.*never a pickle"):
        load_model(f"models:/hostile/{hostile}", uri)

    # The safe version's stored tokenizer replaced by a link to a file outside its directory.
    stored = Path(model_files(f"models:/safe/{version}", uri).tokenizer)
    outside = tmp_path / "outside.json"
    shutil.copy(stored, outside)
    stored.unlink()
    stored.symlink_to(outside)
    with pytest.raises(BundleError, match=r"refusing models:/safe/1: its file tokenizer\.json is a link"):
        load_model(f"models:/safe/{version}", uri)
    fault("no-unpickle", "a registered version holding a pickle; a stored file replaced by a link out of its "
          "directory", 2, "nothing: refused by mmpipe's loader and under MLflow's, naming the file")
