"""The fusion stage's parts on a CPU: both families, generation, the chat format, instruction data."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.config import DataConfig, RunConfig, TaskConfig
from mmcore.data.config import TokenizerConfig
from mmcore.data.instruct import (SHARED, ChatFormat, InstructPreprocessor, caption_request, conversation,
                                  instruction_batch)
from mmcore.data.synthetic.corpus import describe
from mmcore.data.synthetic.questions import CLOSINGS, OPENINGS, WORDINGS, questions, training_questions
from mmcore.data.tokenizer import ASSISTANT, USER, train_tokenizer, with_chat_tokens
from mmcore.eval.generative import parse_scene
from mmcore.models import architecture, build_model, model_config
from mmcore.models.decoder import Packing
from mmcore.models.encode import generate_answers
from mmcore.models.fusion import loss_on_answers
from mmcore.models.generate import IGNORE
from mmcore.models.preprocess import PreprocessConfig
from mmcore.train.parallel import param_groups

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
SCENE = {"key": "k1", "source": "synthetic", "caption": "an image of a red circle left of two blue squares",
         "label": "red circle", "shape": "circle", "color": "red", "count": 1, "relation": "left of",
         "shape2": "square", "color2": "blue", "count2": 2}
DIGIT = {"key": "k2", "source": "sklearn-digits", "caption": "a handwritten digit seven", "label": "7"}


@pytest.fixture(scope="module")
def tokenizer_json():
    captions = [SCENE["caption"], DIGIT["caption"], "three green triangles above a yellow circle"] * 20
    captions += [q.question + " " + q.answer for r in (SCENE, DIGIT) for h in (False, True) for q in questions(r, h)] * 5
    return with_chat_tokens(train_tokenizer(captions, TokenizerConfig(vocab_size=400)).to_str())


LANGUAGE = {**architecture(model_config("lm-debug")), "positions": 128}
"""A language parent's architecture (a transformers Llama), as model.lm_parent puts it in a fusion config."""


def _model(family: str, vocab: int = 400):
    """The family's debug model; "llava-lm", "flamingo-lm": on a transformers LM (a language parent's)."""
    torch.manual_seed(0)
    if family.endswith("-lm"):
        config = {**model_config(f"{family.removesuffix('-lm')}-debug"), "vision": VISION, "language": LANGUAGE}
        return build_model(config, vocab, 3)[0].eval()
    return build_model({**model_config(f"{family}-debug"), "vision": VISION}, vocab, 3)[0].eval()


def _chat_row(row: dict, epoch: int = 0, key: str | None = None) -> dict:
    """The row's questions as an instruction dataset stores a conversation about it (as the corpus's file asks
    them for `epoch`), read in training's epoch 0."""
    turns = [m for q in training_questions(row, seed=0, epoch=epoch)
             for m in ({"from": "human", "value": q.question}, {"from": "gpt", "value": q.answer})]
    return {"key": key or row["key"], "caption": "", "conversations": json.dumps(turns), "epoch": 0}


def _ids(batch: int = 3, length: int = 10, vocab: int = 400):
    ids = torch.randint(10, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, 2] = 2, 4  # <bos>, <image>
    return ids


@pytest.mark.parametrize("family", ["flamingo", "flamingo-lm"])
def test_flamingo_at_initialisation_is_exactly_its_language_model(family):
    """Zero gates: the image changes nothing, on our LM and on a pretrained one whose layers it wraps."""
    model = _model(family)
    ids = _ids()
    with_image = model(torch.randn(3, 3, 32, 32), ids)
    lm_alone = model.lm.head(model.lm(model.lm.embed(ids)))
    assert torch.equal(with_image, lm_alone)
    if family == "flamingo-lm":  # the transformers LM itself, not only our path through it
        assert torch.equal(lm_alone, model.lm.hf(input_ids=ids).logits)
        assert len(model.cross) == LANGUAGE["layers"]
    with torch.no_grad():
        model.cross[0].attn_gate.fill_(0.5)
    assert not torch.equal(model(torch.randn(3, 3, 32, 32), ids), lm_alone)


@pytest.mark.parametrize("family", ["llava", "flamingo", "llava-lm", "flamingo-lm"])
def test_generation_with_the_kv_cache_equals_generation_without(family):
    model = _model(family)
    images, ids = torch.randn(3, 3, 32, 32), _ids()
    cached = model.generate(images, ids, max_new_tokens=12)
    assert cached.shape[1] >= 1
    assert torch.equal(cached, model.generate(images, ids, max_new_tokens=12, use_cache=False))
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    sampled = model.generate(images, ids, max_new_tokens=8, temperature=1.0, top_p=0.9, generator=g1)
    assert torch.equal(sampled, model.generate(images, ids, max_new_tokens=8, temperature=1.0, top_p=0.9,
                                               generator=g2, use_cache=False))


def test_llava_sees_the_image_where_the_image_token_is():
    model = _model("llava")
    ids = _ids()
    a, b = model(torch.randn(3, 3, 32, 32), ids), model(torch.randn(3, 3, 32, 32), ids)
    assert torch.equal(a[:, :2], b[:, :2])  # causal: the tokens before <image> cannot see it
    assert not torch.allclose(a[:, 2:], b[:, 2:])
    ids[1, 2] = 7
    with pytest.raises(ValueError, match="row 1: a prompt needs exactly one <image> token, it has 0"):
        model(torch.randn(3, 3, 32, 32), ids)


def test_the_loss_counts_answer_tokens_only():
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 4:], labels[1, 5] = torch.tensor([3, 5]), 7
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, 3], logits[0, 4], logits[1, 4]]),
                                                 torch.tensor([3, 5, 7]))
    assert torch.allclose(loss_on_answers(logits, labels), expected)


def test_chat_format_labels_the_answer_and_flags_truncation(tokenizer_json):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    chat = ChatFormat(tokenizer, 24)
    ids, labels, truncated = chat.encode("what colour is the circle?", "red")
    assert len(ids) == len(labels) == 24 and not truncated
    answer = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "red"
    assert answer[-1] == tokenizer.token_to_id("<eos>")
    assert ids[:3] == [tokenizer.token_to_id(t) for t in ("<bos>", USER, "<image>")]
    assert ASSISTANT in tokenizer.decode(ids[: ids.index(answer[0])], skip_special_tokens=False)
    assert ChatFormat(tokenizer, 12).encode("what colour is the circle?", "a very long answer indeed")[2]
    with pytest.raises(ValueError, match="lacks the chat tokens"):
        ChatFormat(Tokenizer.from_str(train_tokenizer(["a b"] * 5, TokenizerConfig(vocab_size=300)).to_str()), 8)


CONVERSATION = {"key": "c1", "caption": "what colour is the circle?\nred\nand the square?\nblue",
                "conversations": '[{"from": "human", "value": "what colour is the circle?"}, {"from": "gpt", '
                                 '"value": "red"}, {"from": "human", "value": "and the square?"}, '
                                 '{"from": "gpt", "value": "blue"}]'}
"""A row of an instruction dataset (data/conversations.py's columns)."""


def test_a_conversation_trains_as_one_sequence_with_the_loss_on_every_answer(tokenizer_json):
    """Each answer sees the turns before it (one segment after the shared prefix), the loss counts the answers
    and their <eos>, packed or not; a cut conversation says so."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    chat = ChatFormat(tokenizer, 48)
    batch = instruction_batch([dict(CONVERSATION, epoch=0)], chat, seed=0, pack_length=64)
    ids, labels, segments = batch["input_ids"][0], batch["labels"][0], batch["segments"][0]
    used = int((segments >= 0).sum())
    assert tokenizer.decode(ids[:used].tolist(), skip_special_tokens=False).replace(" ", "") == (
        "<bos><|user|><image>whatcolouristhecircle?<|assistant|>red<eos><|user|>andthesquare?<|assistant|>blue<eos>")
    eos = tokenizer.token_to_id("<eos>")
    words = [tokenizer.encode(w, add_special_tokens=False).ids for w in ("red", "blue")]
    assert [t for t in labels.tolist() if t != IGNORE] == [*words[0], eos, *words[1], eos]
    assert set(segments[SHARED:used].tolist()) == {1} and batch["questions"][0] == 2 and not batch["truncated"][0]
    assert batch["positions"][0][:used].tolist() == list(range(used))
    plain = instruction_batch([dict(CONVERSATION, epoch=0)], chat, seed=0)
    assert plain["input_ids"][0][:used].tolist() == ids[:used].tolist() and plain["input_ids"].shape == (1, 48)
    short = instruction_batch([dict(CONVERSATION, epoch=0)], ChatFormat(tokenizer, 16), seed=0, pack_length=64)
    assert not short["truncated"][0] and short["input_ids"].shape == (1, 64) and short["questions"][0] == 2
    assert short["segments"][0].max() == 2 and short["positions"][0].max() <= 15, "two parts, each in the positions"
    cut = instruction_batch([dict(CONVERSATION, epoch=0)], ChatFormat(tokenizer, 16), seed=0)
    assert cut["truncated"][0] and cut["input_ids"].shape == (1, 16), "unpacked: the first part alone"


def test_a_conversation_in_an_imported_lms_template_labels_what_it_writes_for_each_answer(tokenizer_json):
    from tokenizers import Tokenizer

    from mmcore.data.instruct import TemplateChat, conversation
    from mmcore.data.tokenizer import with_tokens

    chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tokenizer = Tokenizer.from_str(with_tokens(tokenizer_json, ["<|im_start|>", "<|im_end|>"]))
    chat = TemplateChat(tokenizer, 64, chatml, {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    ids, labels, _, positions, truncated, answers = chat.encode_conversation(conversation(CONVERSATION))
    text = tokenizer.decode(ids[: max(positions) + 1], skip_special_tokens=False)
    assert text.replace(" ", "") == ("<|im_start|>user\n<image>\nwhatcolouristhecircle?<|im_end|>\n<|im_start|>"
                                     "assistant\nred<|im_end|>\n<|im_start|>user\nandthesquare?<|im_end|>\n"
                                     "<|im_start|>assistant\nblue<|im_end|>\n").replace(" ", "")
    said = tokenizer.decode([t for t in labels if t != IGNORE], skip_special_tokens=False)
    assert said.replace(" ", "") == "red<|im_end|>\nblue<|im_end|>\n" and answers == 2 and not truncated


def test_with_chat_tokens_appends_roles_once(tokenizer_json):
    from tokenizers import Tokenizer

    again = Tokenizer.from_str(with_chat_tokens(tokenizer_json))
    assert again.get_vocab_size() == Tokenizer.from_str(tokenizer_json).get_vocab_size()
    assert again.token_to_id(USER) is not None and again.token_to_id(ASSISTANT) is not None


def test_questions_follow_the_attribute_columns():
    asked = {q.kind: q for q in questions(SCENE)}
    assert set(asked) == {"caption", "colour", "shape", "count", "relation", "yes_no"}
    assert (asked["colour"].answer, asked["shape"].answer, asked["count"].answer) == ("red", "circle", "one")
    assert asked["relation"].answer == "left of" and "the two" not in asked["relation"].question
    yes_no = asked["yes_no"]
    assert (yes_no.answer == "yes") == ("left of" in yes_no.question)
    assert {q.kind: q.answer for q in questions(DIGIT)} == {"caption": DIGIT["caption"], "digit": "seven"}
    same_shapes = dict(SCENE, shape2="circle")
    assert "colour" not in {q.kind for q in questions(same_shapes)}  # "the circle" would be ambiguous


def test_held_out_wordings_never_reach_the_conversation_file():
    seen = {t for kind in WORDINGS.values() for t in kind[0]}
    held_out = {t for kind in WORDINGS.values() for t in kind[1]}
    assert not seen & held_out
    drawn = [q for i in range(40) for e in range(3) for q in training_questions(dict(SCENE, key=f"k{i}"), 0, e)]
    assert {q.kind for q in drawn} == {"caption", "colour", "shape", "count", "relation", "yes_no"}
    for q in drawn:
        assert all(not _worded_by(q.question, t) for t in held_out)
    assert training_questions(SCENE, 0, 1) == training_questions(dict(SCENE), 0, 1)  # deterministic


def test_a_caption_datasets_row_trains_its_caption_request_and_nothing_else(tokenizer_json):
    """Questions about attribute columns reach training only as a conversation file; a caption dataset's row,
    columns or not, is asked for its caption (LLaVA's alignment data), in a wording drawn per epoch."""
    from tokenizers import Tokenizer

    asked = [caption_request(SCENE, seed=0, epoch=epoch) for epoch in range(8)]
    assert {q.answer for q in asked} == {SCENE["caption"]} and len({q.question for q in asked}) > 1
    assert {q.question for q in asked} <= set(WORDINGS["caption"][0])
    chat = ChatFormat(Tokenizer.from_str(tokenizer_json), 48)
    batch = instruction_batch([dict(SCENE, epoch=0), dict(DIGIT, epoch=0)], chat, seed=0, pack_length=96)
    assert batch["questions"].tolist() == [1, 1]
    answer = batch["labels"][0][batch["labels"][0] != IGNORE][:-1].tolist()
    assert chat.tokenizer.decode(answer).strip() == SCENE["caption"]


def test_no_word_of_the_opening_decides_a_question_type():
    """Seen wordings cross types ("describe the colour ...") and the conversation file adds openings and
    closings; every held-out wording keeps a word that no asked question has."""
    rows = [dict(SCENE, key=f"k{i}") for i in range(60)] + [dict(DIGIT, key=f"d{i}") for i in range(20)]
    drawn = [q for row in rows for e in range(4) for q in training_questions(row, seed=0, epoch=e)]
    opening = {}
    for q in drawn:
        opening.setdefault(q.question.split()[0], set()).add(q.kind)
    assert len(opening["describe"]) >= 4 and any(q.question.startswith(OPENINGS) for q in drawn)
    assert any(q.question.endswith(CLOSINGS) for q in drawn)
    trained_words = {w for q in drawn for w in _words(q.question)}
    for kind, (_, held_out) in WORDINGS.items():
        for template in held_out:
            assert {w for w in _words(template) if not w.startswith("{")} - trained_words, (kind, template)


def _words(text: str) -> set[str]:
    return set(text.replace("?", " ").replace(".", " ").replace(",", " ").replace(":", " ").split())


def _worded_by(question: str, template: str) -> bool:
    fixed = [part for part in template.replace("}", "{").split("{")[::2] if part.strip()]
    return all(part in question for part in fixed)


def test_a_conversation_longer_than_the_context_goes_on_in_parts_after_the_image(tokenizer_json):
    """Packed, the turns that do not fit the context follow in parts of their own: each part is the
    conversation from its first turn on, as if asked alone (after the shared <bos> <|user|> <image>, at its
    own positions); unpacked, the first part alone, marked truncated."""
    from tokenizers import Tokenizer

    chat = ChatFormat(Tokenizer.from_str(tokenizer_json), 32)
    rows = [_chat_row(SCENE, e, f"k{e}") for e in range(3)] + [_chat_row(DIGIT)]
    batch = instruction_batch(rows, chat, seed=0, pack_length=160)
    assert batch["input_ids"].shape == batch["segments"].shape == batch["positions"].shape == (4, 160)
    assert batch["questions"].tolist()[3] == 2 and (batch["questions"][:3] == 6).all()  # every turn trains
    assert (batch["segments"][:3].max(1) >= 2).all(), "a scene's six turns do not fit 32 tokens in one part"
    for row, ids, labels, segments, positions in zip(rows, batch["input_ids"], batch["labels"], batch["segments"],
                                                     batch["positions"]):
        turns, start = conversation(row), 0
        for k in range(1, int(segments.max()) + 1):
            part = segments == k
            alone_ids, alone_labels = ids[:SHARED].tolist() + ids[part].tolist(), labels[part].tolist()
            end = next(e for e in range(start + 1, len(turns) + 1)
                       if chat._conversation(turns[start:e])[0] == alone_ids)
            assert alone_labels == chat._conversation(turns[start:end])[1][SHARED:]
            assert positions[part].tolist() == list(range(SHARED, len(alone_ids)))
            start = end
        assert start == len(turns)
    unpacked = instruction_batch(rows, chat, seed=0)
    assert unpacked["input_ids"].shape == (4, 32)
    assert unpacked["truncated"].tolist() == (batch["segments"].max(1) >= 2).tolist(), "cut where parts follow"
    with pytest.raises(ValueError, match="data.pack_length 16 is shorter than the model's context of 32"):
        InstructPreprocessor(PreprocessConfig(image_size=32, context_length=32), tokenizer_json, pack_length=16)


@pytest.mark.parametrize("family", ["llava", "flamingo", "llava-lm", "flamingo-lm"])
def test_a_packed_question_gets_the_logits_it_gets_alone(family, tokenizer_json):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    model = _model(family, tokenizer.get_vocab_size())
    with torch.no_grad():  # open the gates: a shut Flamingo would ignore the image
        for p in model.parameters():
            if p.numel() == 1:
                p.fill_(0.5)
    chat = ChatFormat(tokenizer, model.cfg.lm.context_length)
    rows = [_chat_row(SCENE, e, f"k{e}") for e in range(2)] + [_chat_row(DIGIT)]
    batch = {k: torch.from_numpy(v) for k, v in instruction_batch(rows, chat, seed=1, pack_length=160).items()}
    images = torch.randn(3, 3, 32, 32)
    packed = model(images, batch["input_ids"], Packing(batch["segments"], batch["positions"]))
    for r in range(3):
        for k in range(1, int(batch["questions"][r]) + 1):
            turn = batch["segments"][r] == k
            ids = batch["input_ids"][r]
            alone = model(images[r:r + 1], torch.cat([ids[:SHARED], ids[turn]])[None])
            assert torch.allclose(packed[r, turn], alone[0, SHARED:], atol=1e-5)
            assert torch.allclose(packed[r, :SHARED], alone[0, :SHARED], atol=1e-5)


def test_instruct_preprocessor_makes_the_fusion_batch(tokenizer_json):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, "PNG")
    pre = InstructPreprocessor(PreprocessConfig(image_size=32, context_length=32), tokenizer_json, seed=3)
    batch = {"image": np.array([buffer.getvalue()] * 2, dtype=object), "epoch": np.array([0, 1]),
             **{k: np.array([SCENE.get(k), DIGIT.get(k)], dtype=object) for k in SCENE}}
    out = pre.for_split("train", augment=False)(batch)
    assert out["image"].shape == (2, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["input_ids"].shape == out["labels"].shape == (2, 32)
    assert ((out["labels"] != IGNORE).sum(1) >= 2).all() and out["truncated"].tolist() == [0, 0]


def test_scene_captions_parse_back_into_their_attributes():
    rng = np.random.default_rng(0)
    from mmcore.data.synthetic.corpus import synthetic_scene

    for _ in range(30):
        _, attrs = synthetic_scene(rng, 64)
        parsed = parse_scene(attrs["caption"])
        assert parsed == {k: attrs.get(k) for k in parsed}
        assert describe(parsed) in attrs["caption"]
    assert parse_scene("a photo of a face") is None


def test_answers_in_batches_equal_answers_one_by_one(tokenizer_json):
    from tokenizers import Tokenizer

    from mmcore.models.preprocess import Preprocessor

    tokenizer = Tokenizer.from_str(tokenizer_json)
    model = _model("llava", tokenizer.get_vocab_size())
    pre = Preprocessor(PreprocessConfig(image_size=32, context_length=32), tokenizer_json)
    images = []
    for color in ((200, 30, 30), (30, 30, 200), (30, 200, 30)):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), color).save(buffer, "PNG")
        images.append(buffer.getvalue())
    prompts = ["describe the image.", "which digit is this?", "what colour is the circle?"]
    together = generate_answers(model, pre, images, prompts, max_new_tokens=5)
    assert together == [generate_answers(model, pre, [i], [p], max_new_tokens=5)[0] for i, p in zip(images, prompts)]
    with pytest.raises(ValueError, match="row 1: the prompt is .* context is 32 tokens"):
        generate_answers(model, pre, images[:2], ["hi", "describe " * 40], max_new_tokens=5)


def test_a_frozen_tower_stays_out_of_the_optimizer():
    from mmcore.tasks import FusionTask

    cfg = RunConfig(task=TaskConfig(stage="fusion", loss="next-token"))
    model, pre = build_model({**model_config("llava-debug"), "vision": VISION}, 400, 3)
    task = FusionTask.build(cfg, model, pre)
    trainable = {id(p) for group in param_groups(task, 0.1) for p in group["params"]}
    assert not any(id(p) in trainable for p in task.model.visual.parameters())
    assert all(id(p) in trainable for p in task.model.projector.parameters())


def test_the_bridge_trains_at_its_own_learning_rate_through_warmup_and_decay():
    """optim.bridge_lr: LLaVA's projector (and image positions) in groups of their own, the LM at optim.lr;
    DeepSpeed's warmup and cosine scale both alike."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from mmcore.tasks import FusionTask
    from mmcore.train.deepspeed_config import build_ds_config

    cfg = RunConfig(task=TaskConfig(stage="fusion", loss="next-token"))
    cfg.optim.lr, cfg.optim.bridge_lr, cfg.optim.warmup_steps, cfg.optim.max_steps = 1e-4, 2e-3, 5, 50
    model, pre = build_model({**model_config("llava-debug"), "vision": VISION, "image_positions": True}, 400, 3)
    task = FusionTask.build(cfg, model, pre)
    groups = param_groups(task, 0.1, task.learning_rates(cfg.optim))
    bridge = {id(p) for g in groups if g.get("lr") == 2e-3 for p in g["params"]}
    assert bridge == {id(p) for p in [*task.model.projector.parameters(), task.model.patch_row,
                                      task.model.patch_column]}
    assert all("lr" not in g for g in groups if any(id(p) not in bridge for p in g["params"]))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    scheduler = WarmupCosineLR(optimizer, **build_ds_config(cfg, "fp32")["scheduler"]["params"])
    for _ in range(30):
        optimizer.step()
        scheduler.step()
        lrs = {g.get("lr") for g in optimizer.param_groups}
        assert max(lrs) == pytest.approx(20 * min(lrs)), "the ratio holds at every step"
    with pytest.raises(ValueError, match="^optim.bridge_lr: the contrastive stage has no tower joined to an LM"):
        RunConfig(data=DataConfig(dataset="d"), optim=dataclasses.replace(cfg.optim)).validate()


def test_question_loss_predicts_each_questions_words_and_counts_it_beside_the_answers(tokenizer_json):
    from tokenizers import Tokenizer

    from mmcore.tasks import FusionTask, question_labels

    chat = ChatFormat(Tokenizer.from_str(tokenizer_json), 32)
    rows = [dict(SCENE, key=f"k{i}", epoch=0) for i in range(3)] + [dict(DIGIT, epoch=1)]
    for pack_length in (0, 96):
        batch = {k: torch.from_numpy(v) for k, v in instruction_batch(rows, chat, 0, pack_length).items()}
        asked = question_labels(batch["input_ids"], batch["labels"], batch.get("segments"))
        for row, row_asked in zip(rows, asked):
            # the turn's prompt after <bos> <|user|> <image> and its first word: the rest, <|assistant|>
            q = caption_request(row, seed=0, epoch=row["epoch"])
            ids, labels, _ = chat.encode(q.question, q.answer)
            expected = [i for t, (i, label) in enumerate(zip(ids, labels))
                        if t > SHARED and label == IGNORE and i != chat.ids["<pad>"]]
            assert row_asked[row_asked != IGNORE].tolist() == expected
        assert not ((asked != IGNORE) & (batch["labels"] != IGNORE)).any()  # an answer's token is not a question's

    torch.manual_seed(0)
    model, pre = build_model({**model_config("llava-debug"), "vision": VISION}, chat.tokenizer.get_vocab_size(), 3)
    batch["image"] = torch.randint(0, 256, (len(rows), 3, 32, 32), dtype=torch.uint8)
    plain = FusionTask.build(RunConfig(task=TaskConfig(stage="fusion", loss="next-token")), model, pre)(batch)
    cfg = RunConfig(task=TaskConfig(stage="fusion", loss="next-token", question_loss=0.5))
    both = FusionTask.build(cfg, model, pre)(batch)
    assert set(plain) == {"loss", "truncated_fraction", "questions_per_image"}
    assert torch.equal(both["answer_loss"], plain["loss"])
    assert torch.allclose(both["loss"], plain["loss"] + 0.5 * both["question_loss"]) and both["question_loss"] > 0
    with pytest.raises(ValueError, match="task.question_loss: is not a setting of the unified stage"):
        TaskConfig(stage="unified", loss="next-token", question_loss=1.0).validate()


def test_vision_layer_picks_the_towers_hidden_state():
    torch.manual_seed(0)
    config = {**model_config("llava-debug"), "vision": {**VISION, "layers": 2}}
    images = torch.randn(2, 3, 32, 32)
    tower = build_model(config, 400, 3)[0].eval().visual
    with torch.no_grad():
        x = tower.patchify(images).flatten(2).transpose(1, 2)
        x = tower.ln_pre(torch.cat([tower.cls.expand(2, -1, -1), x], dim=1) + tower.pos)
        states = [x]
        for block in tower.transformer.blocks:
            states.append(block(states[-1]))
        assert torch.equal(tower(images), tower.ln_post(states[2]))  # the default: what CLIP pools
        assert torch.equal(tower(images, -2), states[1]) and torch.equal(tower(images, 0), states[0])
    llava = build_model({**config, "vision_layer": -2}, 400, 3)[0].eval()
    llava.visual.load_state_dict(tower.state_dict())
    assert torch.equal(llava.image_features(images), states[1])
    with pytest.raises(ValueError, match="vision_layer -4 is outside the tower's 2 layers"):
        build_model({**config, "vision_layer": -4}, 400, 3)


def test_llava_image_positions_add_each_patchs_row_and_column():
    torch.manual_seed(0)
    model = build_model({**model_config("llava-debug"), "vision": VISION, "image_positions": True}, 400, 3)[0].eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, context = model.projector(model.image_features(images)), model.context(images)
        grid = VISION["image_size"] // VISION["patch_size"]
        added = (context - tokens)[:, 1:]  # (B, P, D): the same for every image
        assert torch.equal(context[:, 0], tokens[:, 0])  # CLS has no place in the grid
        for row, column in [(0, 0), (0, grid - 1), (grid - 1, 1)]:
            expected = model.patch_row[row, 0] + model.patch_column[0, column]
            assert torch.allclose(added[:, row * grid + column], expected.expand(2, -1), atol=1e-6)
    assert {"patch_row", "patch_column"} <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_language_parent_too_short_for_the_image_and_the_question_is_refused():
    short = {**LANGUAGE, "context_length": 32, "positions": 0}
    with pytest.raises(ValueError, match="the language model has 32 positions, fewer than the 17 image tokens and "
                                         "48 text tokens"):
        build_model({**model_config("llava-debug"), "vision": VISION, "language": short}, 400, 3)


def test_lora_starts_as_the_lm_trains_only_its_adapters_and_merges_into_a_plain_lm():
    model = _model("llava-lm")
    images, ids = torch.randn(2, 3, 32, 32), _ids(2)
    before = model(images, ids)
    plain_keys = set(model.state_dict())
    model.lm.with_lora(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    assert torch.allclose(model(images, ids), before, atol=1e-6)  # B starts at zero: the LM's own output
    trainable = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    adapted = model(images, ids)
    assert not torch.allclose(adapted, before, atol=1e-3)
    model.merge_adapters()
    assert set(model.state_dict()) == plain_keys and torch.allclose(model(images, ids), adapted, atol=1e-5)


def test_a_frozen_lm_still_trains_the_row_its_parent_lacked_and_saves_it_in_its_table():
    """Flamingo on a frozen imported LM: <image> (added after its 400 rows) trains in a table of its own, the
    parent's rows stay out of the optimizer, and merging writes the trained row back into a plain table."""
    from mmcore.tasks import _train_lm

    parent = _model("flamingo-lm").lm.core
    model = _model("flamingo-lm", vocab=401)
    model.lm.load_parent(parent)
    cfg = RunConfig(task=TaskConfig(stage="fusion", loss="next-token"))
    cfg.model.freeze_lm = True
    _train_lm(cfg, model)
    images, ids = torch.randn(2, 3, 32, 32), _ids(2)
    ids[:, 2] = 400  # the imported LM's <image>
    plain_keys = set(model.state_dict()) - {"lm.new_rows.weight"}
    assert [n for n, p in model.lm.named_parameters() if p.requires_grad] == ["new_rows.weight"]
    assert [g["weight_decay"] for g in param_groups(model.lm, 0.1)] == [0.0], "no decay away from frozen peers"
    (grad,) = torch.autograd.grad(model(images, ids)[:, -1].sum(), model.lm.new_rows.weight)
    assert grad.abs().sum() > 0  # the text after <image> reads the row
    with torch.no_grad():
        model.lm.new_rows.weight.normal_(0, 0.1)
    trained, row = model(images, ids), model.lm.new_rows.weight.detach().clone()
    model.merge_adapters()
    table = model.lm.core.get_input_embeddings().weight
    assert set(model.state_dict()) == plain_keys and torch.equal(table[400:], row)
    assert torch.equal(table[:400], parent.get_input_embeddings().weight)
    assert torch.allclose(model(images, ids), trained, atol=1e-6)


def test_lora_targets_the_lm_does_not_have_are_named_with_those_it_has():
    model = _model("llava-lm")
    with pytest.raises(ValueError, match=r"model.lora.target_modules: the language model has no c_attn; its "
                                         r"linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                         r"up_proj, v_proj"):
        model.lm.with_lora(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "c_attn"])
