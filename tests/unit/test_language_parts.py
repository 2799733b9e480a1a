"""The language stage's parts: its training text in the saved chat template, the Hugging Face directory a
language model is (opened by plain transformers in a fresh process), tied embeddings, pickles refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from mmcore.bundle import BundleError, ModelBundle
from mmcore.data.config import TokenizerConfig
from mmcore.data.passages import TextFormat, TextPreprocessor, passage
from mmcore.data.tokenizer import train_tokenizer, with_chat_tokens
from mmcore.models import build_model, model_config
from mmcore.models.causal_lm import hf_tokenizer
from mmcore.models.generate import IGNORE

CAPTION = "an image of two red circles left of a blue square"
TURNS = [("describe the image.", CAPTION), ("what colour is the circle?", "red"),
         ("where are the circles relative to the blue square?", "left of"), ("how many red circles are there?", "two")]
SCENE = {"key": "000042", "caption": "\n".join(t for turn in TURNS for t in turn), "conversations": json.dumps(
    [m for q, a in TURNS for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})])}
"""An instruction dataset's row, as ingest stores a conversation."""
PHOTO = {"key": "000043", "caption": "a photo of an astronaut", "source": "photo", "label": "astronaut"}


@pytest.fixture(scope="module")
def tokenizer_json():
    captions = [CAPTION, PHOTO["caption"], "what colour is the circle? red", "where are the circles? left of",
                "how many red circles are there? two", "which shape is drawn in blue? square"] * 20
    return with_chat_tokens(train_tokenizer(captions, TokenizerConfig(vocab_size=400)).to_str())


def _lm(tokenizer_json: str, name: str = "lm-debug", **changes):
    config = {**model_config(name), **changes}
    tokenizer = Tokenizer.from_str(tokenizer_json)
    model, preprocess = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id("<eos>"))
    return model.eval(), preprocess, config


def test_the_training_text_is_the_saved_chat_template_token_for_token(tokenizer_json):
    turns = passage(SCENE)
    assert turns == TURNS and passage(PHOTO) == []
    messages = [m for user, answer in turns for m in ({"role": "user", "content": user},
                                                       {"role": "assistant", "content": answer})]
    templated = hf_tokenizer(tokenizer_json, 512).apply_chat_template(messages, tokenize=True,
                                                                      return_dict=True)["input_ids"]
    ids, labels, text, truncated = TextFormat(Tokenizer.from_str(tokenizer_json), 512).encode(SCENE)
    assert ids[: len(templated)] == templated and not truncated
    # The answers (and their <eos>) in one loss, the questions in the other, each token in one.
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos = tokenizer.token_to_id("<eos>")
    said = [t for _, answer in turns for t in (*tokenizer.encode(answer, add_special_tokens=False).ids, eos)]
    assert [t for t in labels if t != IGNORE] == said
    merged = [a if a != IGNORE else b for a, b in zip(labels, text)]
    assert merged[: len(templated)] == [IGNORE, *templated[1:]]
    assert set(labels[len(templated):]) == set(text[len(templated):]) == {IGNORE}
    # A row that answers no question is its caption, as the tokenizer wraps it: all of it in the text loss.
    ids, labels, text, _ = TextFormat(Tokenizer.from_str(tokenizer_json), 64).encode(PHOTO)
    assert ids[: ids.index(0)] == hf_tokenizer(tokenizer_json, 64)(PHOTO["caption"])["input_ids"]
    assert set(labels) == {IGNORE} and text[: ids.index(0)] == ids[: ids.index(0)]


def test_a_short_context_keeps_whole_turns_and_counts_a_cut(tokenizer_json):
    fmt = TextFormat(Tokenizer.from_str(tokenizer_json), 40)
    ids, labels, text, truncated = fmt.encode(SCENE)
    assert len(ids) == len(labels) == len(text) == 40 and not truncated
    assert ids[ids.index(0) - 1] == fmt.ids["<eos>"]  # the last turn kept is whole
    ids, labels, text, truncated = TextFormat(Tokenizer.from_str(tokenizer_json), 12).encode(SCENE)
    assert truncated and len(ids) == len(labels) == len(text) == 12
    batch = TextPreprocessor(_lm(tokenizer_json)[1], tokenizer_json)({
        "key": np.array(["a", "b"]), "caption": np.array([SCENE["caption"], PHOTO["caption"]]),
        "conversations": np.array([SCENE["conversations"], None], dtype=object), "epoch": np.array([0, 1])})
    assert batch["input_ids"].shape == batch["labels"].shape == batch["text_labels"].shape == (2, 96)
    assert batch["truncated"].tolist() == [0, 0]


def test_the_text_loss_is_weighed_against_the_answers_and_captions_alone_train_the_text_only(tokenizer_json):
    from mmcore.tasks import LanguageTask

    model, preprocess, _ = _lm(tokenizer_json)
    pre = TextPreprocessor(preprocess, tokenizer_json)
    rows = {"key": np.array(["a", "b"]), "caption": np.array([SCENE["caption"], PHOTO["caption"]]),
            "epoch": np.array([0, 0]), "conversations": np.array([SCENE["conversations"], None], dtype=object)}
    batch = {k: torch.from_numpy(v) for k, v in pre(rows).items()}
    out = LanguageTask(model, text_loss=0.25)(batch)
    assert float(out["answer_loss"]) > 0 and float(out["text_loss"]) > 0
    assert out["loss"].item() == pytest.approx((out["answer_loss"] + 0.25 * out["text_loss"]).item(), rel=1e-6)
    photos = {k: torch.from_numpy(v) for k, v in pre({k: v[1:] for k, v in rows.items()}).items()}
    out = LanguageTask(model, text_loss=0.25)(photos)  # web captions: no answer to learn, a finite loss
    assert float(out["answer_loss"]) == 0 and torch.isfinite(out["loss"]) and float(out["loss"]) > 0
    grads = torch.autograd.grad(out["loss"], [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_a_language_model_is_a_hugging_face_directory_that_plain_transformers_opens(tokenizer_json, tmp_path):
    model, preprocess, config = _lm(tokenizer_json)
    bundle = ModelBundle.write(tmp_path / "lm", model, config, tokenizer_json, preprocess)
    assert bundle.hugging_face and {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                                    "model.json", "preprocess.json"} <= {p.name for p in bundle.directory.iterdir()}
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    ours = model(ids)
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(bundle.directory)!r})
tokenizer = AutoTokenizer.from_pretrained({str(bundle.directory)!r})
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "what colour?"}}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
print(json.dumps({{"class": type(model).__name__, "logits": model(torch.tensor({ids.tolist()})).logits.tolist(),
                   "prompt": tokenizer.convert_ids_to_tokens(prompt), "eos": tokenizer.eos_token,
                   "pad": tokenizer.pad_token, "image": tokenizer.image_token}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["class"] == "LlamaForCausalLM"
    assert torch.allclose(torch.tensor(found["logits"]), ours, atol=1e-5)
    assert found["prompt"][:2] == ["<bos>", "<|user|>"] and found["prompt"][-1] == "<|assistant|>"
    assert (found["eos"], found["pad"], found["image"]) == ("<eos>", "<pad>", "<image>")
    loaded, _ = bundle.load()
    assert torch.allclose(loaded(ids), ours, atol=1e-6)


def test_gpt2_style_with_tied_embeddings_saves_them_once(tokenizer_json, tmp_path):
    from safetensors import safe_open

    model, preprocess, config = _lm(tokenizer_json, architecture="gpt2",
                                    extra={"tie_word_embeddings": True, "n_inner": 128})
    assert model.lm.lm_head.weight.data_ptr() == model.lm.transformer.wte.weight.data_ptr()
    bundle = ModelBundle.write(tmp_path / "gpt2", model, config, tokenizer_json, preprocess)
    with safe_open(bundle.weights, "pt") as weights:
        keys = set(weights.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    loaded, _ = bundle.load()
    assert loaded.lm.lm_head.weight.data_ptr() == loaded.lm.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[2, 10, 11, 12]])
    assert torch.allclose(loaded(ids), model(ids), atol=1e-6)


def test_answers_do_not_depend_on_the_other_prompts_of_a_batch(tokenizer_json, tmp_path):
    model, preprocess, config = _lm(tokenizer_json)
    loaded, _ = ModelBundle.write(tmp_path / "lm", model, config, tokenizer_json, preprocess).load()
    # lengths differ (left padding); the first is a conversation, as the text suite asks after the caption
    prompts = [[{"role": "user", "content": TURNS[0][0]}, {"role": "assistant", "content": CAPTION},
                {"role": "user", "content": "what colour is the circle?"}], "which shape?"]
    together = loaded.complete(prompts, max_new_tokens=4)
    assert together == [loaded.complete([p], max_new_tokens=4)[0] for p in prompts]
    ids, _, _, _ = TextFormat(Tokenizer.from_str(tokenizer_json), 512).encode(SCENE)
    asked = loaded._chat_prompts(prompts[:1])[0]
    assert ids[: len(asked)] == asked, "the conversation is asked as the training text has it, to the next answer"
    (total, tokens), = loaded.text_nll([PHOTO["caption"]])
    assert tokens == len(loaded.tokenizer(PHOTO["caption"])["input_ids"]) - 1 and total > 0


def test_a_language_model_directory_with_a_pickle_is_refused(tokenizer_json, tmp_path):
    model, preprocess, config = _lm(tokenizer_json)
    bundle = ModelBundle.write(tmp_path / "lm", model, config, tokenizer_json, preprocess)
    (bundle.directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BundleError, match="pytorch_model.bin.*never a pickle"):
        ModelBundle.checked(bundle.directory, "models:/mmpipe-language/1")
    (bundle.directory / "pytorch_model.bin").unlink()
    (bundle.directory / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="no .safetensors weights"):
        ModelBundle.checked(bundle.directory, "models:/mmpipe-language/1")


def test_llava_on_a_gpt2_style_lm_with_tied_embeddings_saves_and_loads(tokenizer_json, tmp_path):
    from mmcore.models import architecture

    language = {**architecture(model_config("lm-debug")), "architecture": "gpt2", "positions": 128,
                "extra": {"tie_word_embeddings": True}}
    config = {**model_config("llava-debug"), "language": language,
              "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}}
    tokenizer = Tokenizer.from_str(tokenizer_json)
    model, preprocess = build_model(config, tokenizer.get_vocab_size(), tokenizer.token_to_id("<eos>"))
    assert type(model.lm.hf).__name__ == "GPT2LMHeadModel"
    loaded, _ = ModelBundle.write(tmp_path / "llava", model.eval(), config, tokenizer_json, preprocess).load()
    ids = torch.tensor([[2, 4, 10, 11, 12]])
    images = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(images, ids), model(images, ids), atol=1e-6)
    assert loaded.lm.hf.lm_head.weight.data_ptr() == loaded.lm.hf.transformer.wte.weight.data_ptr()
