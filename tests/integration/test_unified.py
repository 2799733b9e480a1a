"""The unified stage for real: the registered image tokenizer as parent, DeepSpeed ZeRO-2 in this process
and on 2 Ray Train workers (codes made in the Ray Data step) with one killed, evaluation by the shared
suites, the pyfunc in a fresh process."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from mmcore.train.fit import fit
from tests.integration.workers import HERE, fit_killing_a_worker

pytestmark = pytest.mark.integration


def unified_config(dataset, parent: str, *overrides):
    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe

    return apply_overrides(recipe("debug-unified", str(dataset.path)),
                           [f"model.parent={json.dumps(parent)}", *overrides])


@pytest.fixture(scope="module")
def unified(image_tokenizer, train_dataset, train_chats, mmpipe_home):
    """The debug unified model on the debug image tokenizer (by version): 200 steps, ZeRO-2, trained here
    (one rank); it draws the caption dataset's images and reads the corpus's conversations, mixed half and half
    (as the retrain flow mixes them), conversations packed."""
    return fit(unified_config(train_dataset, image_tokenizer.model_uri, "optim.max_steps=200",
                              "checkpoint.every_steps=100", f'data.mix={{"{train_chats.path}": 0.5}}',
                              "data.draw_fraction=1.0", *HERE))


def _history(run_id: str, key: str, mmpipe_home) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_unified_learns_both_modalities_and_records_its_tokenizer(unified, image_tokenizer, train_chats, mmpipe_home):
    from mlflow.tracking import MlflowClient

    text = _history(unified.mlflow_run_id, "text_loss", mmpipe_home)
    image = _history(unified.mlflow_run_id, "image_loss", mmpipe_home)
    assert len(text) == len(image) == 20
    assert text[-1] < 0.5 * text[0] and image[-1] < image[0] - 0.3, (text, image)
    assert unified.model_name == "mmpipe-unified" and unified.metrics["bad_steps"] == 0
    # Packed: a scene's conversation has 4 to 6 turns (a digit's 2). Over the run: the last window alone can hold
    # digits' conversations only (it did, 1.0, on one session's corpus; the run's windows averaged 1.04).
    packed = _history(unified.mlflow_run_id, "questions_per_image", mmpipe_home)
    assert sum(packed) / len(packed) > 1.0, packed
    version = MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}").get_model_version("mmpipe-unified",
                                                                                         unified.model_version)
    assert version.tags["parent_model"] == f"{image_tokenizer.model_name}/{image_tokenizer.model_version}"
    assert version.tags["stage"] == "unified"
    assert json.loads(version.tags["mixed_datasets"]) == {train_chats.id: 0.5}


def test_the_shared_suites_and_text_to_image_run_on_the_unified_model(unified, train_dataset, mmpipe_home):
    from mlflow.tracking import MlflowClient

    from mmcore.eval.run import evaluate

    report = evaluate(unified.model_uri, str(train_dataset.path))
    assert report.ok, report.errors
    assert {"vqa", "captioning", "compositional", "text-to-image"} <= set(report.metrics)
    drawn = report.metrics["text-to-image"]
    correct = drawn["pixel_colour_accuracy"] * drawn["n"]  # a share of the drawn images, each judged once
    assert drawn["n"] > 0 and abs(correct - round(correct)) < 1e-6, drawn
    assert drawn["pixel_colour_accuracy_real"] > 0.9, "the pixel check reads the real scenes' colours"
    logged = {a.path for a in MlflowClient(f"sqlite:///{mmpipe_home / 'mlflow.db'}").list_artifacts(
        report.mlflow_run_id, "text-to-image")}
    assert "text-to-image/drawn.png" in logged


def test_a_fresh_process_gets_text_and_a_png_through_the_pyfunc_by_alias(unified, train_dataset, mmpipe_home):
    blob = train_dataset.read("test", columns=["image"]).column("image")[0].as_py()
    path = mmpipe_home / "unified-question.png"
    with Image.open(io.BytesIO(blob)) as image:  # the model's 32 pixels, and 48: resized, and said so
        image.resize((32, 32)).save(path)
        image.resize((48, 48)).save(mmpipe_home / "unified-large.png")
    code = ("import sys, json, base64, mlflow, pandas as pd; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/mmpipe-unified@candidate'); "
            "text = m.predict(pd.DataFrame({'image': [open(p, 'rb').read() for p in sys.argv[2:]], "
            "'prompt': ['what colour is the circle?'] * 2})); "
            "png = m.predict(pd.DataFrame({'prompt': ['a red circle']}), params={'output': 'image'}); "
            "print(json.dumps({'text': list(text), 'png': base64.b64encode(png[0]).decode()}))")
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{mmpipe_home / 'mlflow.db'}", str(path),
                          str(mmpipe_home / "unified-large.png")], capture_output=True, text=True, timeout=300,
                         check=True)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(answer["text"]) == 2 and all(isinstance(text, str) for text in answer["text"])
    assert "UserWarning: rows 1 (48x48): images resized to 32x32 pixels" in out.stderr, out.stderr[-2000:]
    with Image.open(io.BytesIO(base64.b64decode(answer["png"]))) as image:
        assert image.format == "PNG" and image.size == (32, 32)


@pytest.mark.fault
def test_unified_resumes_after_a_killed_worker(image_tokenizer, train_dataset, local_ray, mmpipe_home, fault):
    cfg = unified_config(train_dataset, image_tokenizer.model_uri, "optim.max_steps=60", "checkpoint.every_steps=20",
                         "checkpoint.max_failures=1", 'tracking.model_name="mmpipe-unified-resumed"')
    result, killed_at = fit_killing_a_worker(cfg, mmpipe_home / "runs",
                                             "debug-unified-unified-*/checkpoints/step-00000020")
    assert result.metrics["step"] == 60 and result.metrics["resumed_from"] >= 20
    fault("worker-killed", "SIGKILL to a Ray Train worker after the step-20 checkpoint (unified)", 1,
          f"killed at step {killed_at}, resumed from step {result.metrics['resumed_from']}")


def test_a_bad_tokenizer_parent_fails_before_any_worker(image_tokenizer, train_dataset, mmpipe_home):
    runs = mmpipe_home / "runs"
    before = set(runs.glob("*"))
    with pytest.raises(ValueError, match="model.parent: models:/nope@champion: no registered model named 'nope'"):
        fit(unified_config(train_dataset, "models:/nope@champion"))
    with pytest.raises(ValueError, match="the unified stage needs a registered image-tokenizer model"):
        fit(unified_config(train_dataset, "runs/tokenizer"))
    assert set(runs.glob("*")) == before, "no run directory is left behind"


def test_unified_on_a_language_parent_starts_from_its_lm_and_reads_and_draws(image_tokenizer, language_model,
                                                                            train_dataset, mmpipe_home):
    import torch
    from tokenizers import Tokenizer

    from mmcore import registry
    from mmcore.config import TrackingConfig
    from mmcore.eval.run import evaluate
    from mmcore.tracking import resolve_uri

    fused = fit(unified_config(train_dataset, image_tokenizer.model_uri,
                               f'model.lm_parent="{language_model.model_uri}"', "model.freeze_lm=true",
                               "optim.max_steps=10", "checkpoint.every_steps=5",
                               'tracking.model_name="mmpipe-unified-on-lm"', 'tracking.alias="on-lm"', *HERE))
    model, preprocess = registry.load_model(fused.model_uri)
    parent, parent_preprocess = registry.load_model(language_model.model_uri)
    ours, theirs = model.lm.hf.get_input_embeddings().weight, parent.lm.get_input_embeddings().weight
    text = Tokenizer.from_str(parent_preprocess.tokenizer_json).get_vocab_size()
    assert model.offset == text + 2 and ours.shape[0] == text + 2 + model.image_tokenizer.codebook_size, \
        "the parent's table grown by the image span tokens and the codes"
    named = Tokenizer.from_str(preprocess.tokenizer_json)
    last = model.image_tokenizer.codebook_size - 1
    assert [named.token_to_id(f"<|image_code_{c}|>") for c in (0, last)] == [model.offset, model.offset + last], \
        "the codes are named tokens of the registered tokenizer"
    assert torch.equal(ours[:text], theirs[:text]), "the frozen LM is the parent's"
    assert not torch.allclose(ours[text:], theirs.mean(0).expand(ours.shape[0] - text, -1)), \
        "the new rows (from the mean) trained beside the frozen LM"
    report = evaluate(fused.model_uri, str(train_dataset.path), suites=["vqa", "text-to-image"])
    assert report.ok, report.errors
    tags = registry.version_tags("mmpipe-unified-on-lm", fused.model_version, resolve_uri(TrackingConfig()))
    assert tags["lm_parent_model"] == language_model.model_uri.removeprefix("models:/")


def test_unified_on_an_imported_lm_reads_and_draws_in_its_chat_template(image_tokenizer, train_dataset, mmpipe_home,
                                                                       tmp_path):
    """An imported ChatML LM (its own byte-level BPE, no <image>, no <bos>) as the unified transformer: a drawing
    sample is the caption as the user's message and the image as the assistant's turn; <image>, the span and the
    codes are added to its tokenizer after its own tokens; the registered model reads and draws."""
    from mmcore import registry
    from mmcore.data.instruct import ChatFormat
    from mmcore.data.mixed import MixedFormat
    from mmcore.eval.run import evaluate
    from mmcore.hub import import_model
    from tests.integration.test_import_clip import _chatml_lm

    directory, vocab = _chatml_lm(tmp_path / "tiny-chatml", train_dataset)
    lm = import_model(str(directory), "language", alias="chatml-unified")
    fused = fit(unified_config(train_dataset, image_tokenizer.model_uri, f'model.lm_parent="{lm}"',
                               "data.pack_length=0", "optim.max_steps=10", "checkpoint.every_steps=5",
                               'tracking.model_name="mmpipe-unified-chatml"', 'tracking.alias="chatml"', *HERE))
    model, preprocess = registry.load_model(fused.model_uri)
    chat = ChatFormat.of(preprocess)
    ids, labels, cut = MixedFormat(chat).drawing("a red circle")
    assert chat.tokenizer.decode(ids, skip_special_tokens=False).startswith(
        "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<image><|im_end|>") and not cut
    assert [t for t in labels if t != -100] == [chat.eos], "the image's codes are labelled once expanded"
    assert model.offset == chat.tokenizer.token_to_id("<|image_code_0|>") == vocab + 3  # <image>, start, end
    assert (model.image_id, model.start_id) == (vocab, vocab + 1)
    report = evaluate(fused.model_uri, str(train_dataset.path), suites=["vqa", "text-to-image"])
    assert report.ok, report.errors
