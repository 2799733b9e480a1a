"""The unified stage's parts on a CPU: mixed-modal samples, the model's reading and drawing, its loss."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from mmcore.data.config import TokenizerConfig
from mmcore.data.instruct import ChatFormat
from mmcore.data.mixed import MixedPreprocessor
from mmcore.data.synthetic.questions import questions, training_questions
from mmcore.data.tokenizer import train_tokenizer
from mmcore.models import architecture, build_model, build_model_for, capabilities, model_config
from mmcore.models.decoder import Packing
from mmcore.models.generate import IGNORE
from mmcore.models.unified import unified_loss
from mmcore.tasks import UnifiedTask

TOKENIZER = architecture(model_config("vq-debug"))
ARCH = {**model_config("unified-debug"), "image_tokenizer": TOKENIZER}
SCENES = [{"key": f"k{i}", "source": "synthetic", "caption": f"an image of {n} {c} circles", "label": f"{c} circle",
           "shape": "circle", "color": c, "count": k, "relation": None, "shape2": None, "color2": None, "count2": None}
          for i, (n, c, k) in enumerate([("two", "red", 2), ("three", "blue", 3)] * 8)]
ROWS = [{"key": s["key"], "caption": s["caption"], "conversations": None} for s in SCENES[:8]] + [
    {"key": s["key"], "caption": "", "conversations": json.dumps(
        [m for q in training_questions(s, 0, 0) for m in ({"from": "human", "value": q.question},
                                                          {"from": "gpt", "value": q.answer})])} for s in SCENES[8:]]
"""A mix of a caption dataset's rows and an instruction dataset's (conversations about the other scenes)."""


def _text_tokenizer() -> str:
    captions = [s["caption"] for s in SCENES] * 10 + [q.question + " " + q.answer for s in SCENES[:2]
                                                     for q in questions(s)] * 5
    return train_tokenizer(captions, TokenizerConfig(vocab_size=400)).to_str()


@pytest.fixture(scope="module")
def tokenizer_json():
    return UnifiedTask.tokenizer(_text_tokenizer(), ARCH)


LANGUAGE = {**architecture(model_config("lm-debug")), "positions": 512}
"""A language parent's architecture (a transformers Llama), as model.lm_parent puts it in a unified config."""


@pytest.fixture(scope="module", params=["own", "on-a-language-parent"])
def unified(tokenizer_json, request):
    """The debug unified model: its own transformer, or a language parent's transformers LM."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    language = {"language": LANGUAGE} if request.param == "on-a-language-parent" else {}
    model, pre = build_model_for({**ARCH, **language}, tokenizer)
    return model.eval(), pre, tokenizer


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_mixed_samples_read_or_draw_the_image_as_codes(unified, tokenizer_json):
    model, pre, tokenizer = unified
    weights = {k: v.numpy() for k, v in model.image_tokenizer.state_dict().items()}
    mixed = MixedPreprocessor(pre, tokenizer_json, {"config": TOKENIZER, "state": weights}, seed=1)
    batch = {"image": np.array([_png((200, 30, 30))] * len(ROWS), dtype=object), "epoch": np.zeros(len(ROWS)),
             **{k: np.array([r[k] for r in ROWS], dtype=object) for k in ROWS[0]}}
    out = mixed(batch)
    length = pre.context_length + model.image_codes + 1
    assert out["input_ids"].shape == out["labels"].shape == (len(ROWS), length) and "image" not in out
    assert np.array_equal(out["input_ids"], mixed(batch)["input_ids"]), "a row's sample depends on (seed, epoch, key)"
    assert 0 < out["drawing"][:8].sum() < 8 and not out["drawing"][8:].any(), "captions draw, conversations read"
    every = MixedPreprocessor(pre, tokenizer_json, {"config": TOKENIZER, "state": weights}, seed=1, draw_fraction=1)
    assert every(batch)["drawing"].tolist() == [1] * 8 + [0] * 8
    offset = model.offset
    codes = model.image_tokenizer.encode(torch.from_numpy(mixed.images([batch["image"][0]])))[0]
    expected_codes = codes + offset
    names = [f"<|image_code_{int(c)}|>" for c in codes[:2]]
    assert [tokenizer.id_to_token(int(i)) for i in expected_codes[:2]] == names, "codes are named tokens"
    assert (model.start_id, model.end_id) == (tokenizer.token_to_id("<|image_start|>"),
                                              tokenizer.token_to_id("<|image_end|>"))
    for ids, labels, drawing in zip(out["input_ids"], out["labels"], out["drawing"]):
        start = int(np.flatnonzero(ids == model.start_id)[0])
        assert ids[start + model.image_codes + 1] == model.end_id and (ids == model.start_id).sum() == 1
        assert np.array_equal(ids[start + 1: start + 1 + model.image_codes], expected_codes.numpy())
        counted = labels[labels != IGNORE]
        if drawing:  # the codes, the end marker and <eos> are counted; the prompt is not
            assert (counted >= offset).sum() == model.image_codes and counted[-1] == tokenizer.token_to_id("<eos>")
        else:  # an answer about the image: text only
            assert (counted < offset - 2).all() and len(counted) >= 2


def test_packed_unified_samples_give_each_question_the_logits_it_gets_alone(unified, tokenizer_json):
    model, pre, tokenizer = unified
    weights = {k: v.numpy() for k, v in model.image_tokenizer.state_dict().items()}
    image_tokenizer = {"config": TOKENIZER, "state": weights}
    batch = {"image": np.array([_png((30, 30, 200))] * len(ROWS), dtype=object), "epoch": np.ones(len(ROWS)),
             **{k: np.array([r[k] for r in ROWS], dtype=object) for k in ROWS[0]}}
    packed = MixedPreprocessor(pre, tokenizer_json, image_tokenizer, seed=2, pack_length=80)(batch)
    alone = MixedPreprocessor(pre, tokenizer_json, image_tokenizer, seed=2)(batch)
    assert packed["input_ids"].shape == packed["segments"].shape == (len(ROWS), 80 + model.image_codes + 1)
    assert np.array_equal(packed["drawing"], alone["drawing"])  # packing changes what a reading sample asks only
    reading = packed["drawing"] == 0
    assert (packed["questions"][8:] == 4).all(), "a conversation's four turns train, in parts after the first"
    assert (packed["segments"][8:].max(1) >= 2).all() and (packed["questions"][~reading] == 0).all()
    data = {k: torch.from_numpy(v) for k, v in packed.items()}
    with torch.no_grad():
        logits = model.logits(data["input_ids"], Packing(data["segments"], data["positions"]))
        for r in range(len(ROWS)):
            ids, segments = data["input_ids"][r], data["segments"][r]
            if not reading[r]:  # a drawing is its unpacked sample, padded further
                n = alone["input_ids"].shape[1]
                assert torch.equal(ids[:n], torch.from_numpy(alone["input_ids"][r]))
                assert torch.allclose(logits[r, :n][segments[:n] > 0], model.logits(ids[:n][None])[0][segments[:n] > 0],
                                      atol=1e-5)
                continue
            prefix = segments == 0  # <bos> <|user|> and the image's span
            assert int(prefix.sum()) == 2 + model.image_codes + 2
            for k in range(1, int(segments.max()) + 1):
                turn = segments == k
                single = model.logits(torch.cat([ids[prefix], ids[turn]])[None])[0]
                assert torch.allclose(logits[r, turn], single[int(prefix.sum()):], atol=1e-5)
                assert torch.allclose(logits[r, prefix], single[:int(prefix.sum())], atol=1e-5)


def test_reading_writes_text_only_and_the_cache_changes_nothing(unified):
    model, pre, tokenizer = unified
    chat = ChatFormat(tokenizer, pre.context_length)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompt = torch.tensor([chat.prompt("what colour are the circles?")] * 3)
    cached = model.generate(images, prompt, max_new_tokens=8)
    assert torch.equal(cached, model.generate(images, prompt, max_new_tokens=8, use_cache=False))
    assert int(cached.max()) < model.offset, "no image code is written as text"
    assert {"generate", "score", "generate_image"} <= capabilities(model)


@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 5},
                                      {"temperature": 1.0, "guidance": 3.0}])
def test_drawing_samples_image_codes_only_and_decodes_to_the_image_size(unified, settings):
    model, _, tokenizer = unified
    prompt = torch.tensor([[tokenizer.token_to_id("<bos>"), *tokenizer.encode("two red circles").ids[1:-1]]] * 4)
    codes = model.generate_image_codes(prompt, generator=torch.Generator().manual_seed(0), **settings)
    assert codes.shape == (4, model.image_codes) and int(codes.min()) >= 0
    assert int(codes.max()) < model.image_tokenizer.codebook_size
    images = model.generate_image(prompt, generator=torch.Generator().manual_seed(0), **settings)
    assert images.shape == (4, 3, 32, 32) and images.abs().max() <= 1
    too_long = torch.ones(1, model.lm.max_positions - model.image_codes, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the context"):
        model.generate_image_codes(too_long)


def test_the_loss_reports_text_and_image_apart_and_adds_the_z_loss(unified):
    model, _, _ = unified
    torch.manual_seed(1)
    logits = torch.randn(2, 6, model.lm.cfg.vocab_size)
    image_token, text_token = model.offset + 3, 7
    labels = torch.tensor([[IGNORE, text_token, text_token, IGNORE, image_token, image_token],
                           [IGNORE, IGNORE, image_token, text_token, IGNORE, IGNORE]])
    out = unified_loss(model, logits, labels)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                                            ignore_index=IGNORE).view(2, 5)
    targets = labels[:, 1:]
    assert out["text_loss"] == pytest.approx(float(nll[targets == text_token].mean()), rel=1e-5)
    assert out["image_loss"] == pytest.approx(float(nll[targets == image_token].mean()), rel=1e-5)
    log_z = torch.logsumexp(logits[:, :-1], -1)[targets != IGNORE]
    assert out["z_loss"] == pytest.approx(model.cfg.z_loss * float((log_z ** 2).mean()), rel=1e-5)
    # Reading and drawing weigh as two tasks, whatever their token counts.
    assert out["loss"] == pytest.approx(float(out["text_loss"] + out["image_loss"] + out["z_loss"]), rel=1e-5)


def test_qk_norm_is_on_in_the_unified_configs(tokenizer_json):
    model, _ = build_model_for(ARCH, Tokenizer.from_str(tokenizer_json))
    assert isinstance(model.lm.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    llava, _ = build_model({**model_config("llava-debug"), "vision": {"image_size": 32, "patch_size": 8, "width": 32,
                                                                      "layers": 1, "heads": 2}}, 300, 3)
    assert isinstance(llava.lm.blocks[0].attn.q_norm, torch.nn.Identity), "registered fusion models load unchanged"


def test_factored_codes_share_what_is_learned_with_codes_of_the_same_fsq_levels(unified):
    model = unified[0]
    assert model.cfg.factored_codes, "the unified configs factor the codes"
    digits = model.image_tokenizer.quantizer.indices_to_level_indices(
        torch.arange(model.image_tokenizer.codebook_size)).long()
    target = 0
    neighbour = int(((digits != digits[target]).sum(1) == 1).nonzero()[0])  # one FSQ level apart
    stranger = int(((digits != digits[target]).all(1)).nonzero()[0])  # no level in common
    states = torch.randn(1, model.cfg.lm.width, generator=torch.Generator().manual_seed(0))
    parts = [model.lm.head.weight, model.digit_head.weight]
    before = model.head(states)[0, model.offset:].detach()
    loss = -torch.log_softmax(model.head(states), -1)[0, model.offset + target]
    grads = torch.autograd.grad(loss, parts)
    with torch.no_grad():
        for weight, grad in zip(parts, grads):
            weight -= 0.5 * grad
    after = model.head(states)[0, model.offset:].detach()
    for weight, grad in zip(parts, grads):  # undo: the module fixture is shared
        weight.data += 0.5 * grad
    change = after - before
    # Learning "this code here" also raises the codes that share its levels (similar colours and edges);
    # a plain softmax head would lower every other code.
    assert change[target] > change[neighbour] > 0 > change[stranger]


def test_drawing_one_code_at_a_time_sees_what_the_whole_sequence_shows(unified):
    """The cached, code-by-code drawing gives each code the embedding (digits, row and column) it has in a
    whole training sequence: greedy codes are the argmax of the full sequence's logits at every position."""
    model, _, tokenizer = unified
    prompt = torch.tensor([[tokenizer.token_to_id("<bos>"), *tokenizer.encode("three blue circles").ids[1:-1]]])
    codes = model.generate_image_codes(prompt, temperature=0.0)
    sequence = torch.cat([prompt, torch.tensor([[model.start_id]]), codes + model.offset], dim=1)
    logits = model.logits(sequence)[0, prompt.shape[1]: -1, model.offset:]
    assert torch.equal(logits.argmax(-1), codes[0])


def test_a_unified_model_registered_before_its_codes_were_named_loads_with_them_at_their_ids(tokenizer_json,
                                                                                           tmp_path):
    """Its tokenizer ended with the span tokens and its codes were the ids after it: loading names them there."""
    from mmcore.bundle import ModelBundle
    from mmcore.data.tokenizer import CHAT_TOKENS, IMAGE_SPAN_TOKENS, with_tokens

    old = with_tokens(_text_tokenizer(), CHAT_TOKENS + IMAGE_SPAN_TOKENS)
    torch.manual_seed(0)
    model, pre = build_model_for(ARCH, Tokenizer.from_str(tokenizer_json))
    ModelBundle.write(tmp_path, model, ARCH, old, pre)
    loaded, preprocessor = ModelBundle.at(tmp_path).load()
    assert loaded.offset == model.offset == Tokenizer.from_str(old).get_vocab_size()
    assert Tokenizer.from_str(preprocessor.tokenizer_json).token_to_id("<|image_code_0|>") == model.offset
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
