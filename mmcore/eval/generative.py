"""Suites for models that generate: VQA (exact match per question type, seen and held-out wordings)
and captioning (the generated caption parsed back into the scene's attributes; CIDEr and BLEU-4
from pycocoevalcap, the COCO caption benchmark's own code)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from mmcore.data.instruct import CAPTION_PROMPT, ChatFormat, Question, conversation
from mmcore.data.synthetic import questions as attributes
from mmcore.data.synthetic.corpus import COLORS, SHAPES
from mmcore.eval.contrastive import rows
from mmcore.eval.suites import SAMPLE_COLUMNS, SuiteError, SuiteResult, suite
from mmcore.models.encode import generate_answers

ANSWER_TOKENS = 6
"""New tokens allowed for a VQA answer (the longest, "right of" + <eos>, is about 3)."""


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!]")


def vqa_normalize(text: str) -> str:
    """An answer as the VQAv2 evaluation compares it: lower case, punctuation out (a full stop not between
    digits, commas in numbers), number words as digits, articles dropped (its processPunctuation and
    processDigitArticle, less its table of contractions)."""
    text = re.sub(r"(\d),(\d)", r"\1\2", text.lower().replace("\n", " "))
    text = re.sub(r"(?<!\d)\.(?!\d)", "", _VQA_PUNCTUATION.sub(" ", text))
    return " ".join(_VQA_NUMBERS.get(word, word) for word in text.split() if word not in ("a", "an", "the"))


def exact_match(frame: pd.DataFrame, overall: str = "accuracy",
                normalize=normalize_answer) -> tuple[dict[str, float], pd.DataFrame]:
    """Marks each row of `frame` (kind, held_out, answer, generated) `correct` when the generated answer,
    normalized, is the answer -> the accuracy over all (`overall`, `heldout_<overall>`) and per kind
    (`<kind>_accuracy`, `heldout_<kind>_accuracy`), and the table of each kind's mean and size."""
    frame["correct"] = [normalize(g) == normalize(a) for g, a in zip(frame.generated, frame.answer)]
    metrics = {}
    for held_out, prefix in ((False, ""), (True, "heldout_")):
        part = frame[frame.held_out == held_out]
        metrics[f"{prefix}{overall}"] = float(part.correct.mean())
        for kind, group in part.groupby("kind"):
            metrics[f"{prefix}{kind}_accuracy"] = float(group.correct.mean())
    return metrics, frame.groupby(["kind", "held_out"]).correct.agg(["mean", "size"]).reset_index()


def attribute_questions(records: list[dict]) -> list[tuple[dict, Question]]:
    """(row, question) for every question about the rows' attributes, seen and held-out wordings (not the
    caption request)."""
    return [(row, q) for row in records for held_out in (False, True) for q in attributes.questions(row, held_out)
            if q.kind != "caption"]


def ask(model, preprocess, asked: list[tuple[dict, Question]]) -> list[str]:
    """The model's greedy answers to (row, question) pairs as the vqa suite asks them: at most
    ANSWER_TOKENS new tokens each, not yet normalized."""
    return generate_answers(model, preprocess, [r["image"] for r, _ in asked], [q.question for _, q in asked],
                            max_new_tokens=ANSWER_TOKENS)


def _test_rows(version) -> list[dict]:
    """The test split's rows: the image, the caption and those of the sample corpus's attribute columns the
    dataset has."""
    extras = version.manifest["source"].get("extras", [])
    return rows(version, ["image", "caption", *[c for c in attributes.COLUMNS if c in extras]]).to_pylist()


@suite("vqa", {"generate"}, "questions about colour, shape, count, relation, yes/no and digits, or an instruction "
       "dataset's conversations; exact match", SAMPLE_COLUMNS, kinds=("captions", "instructions"))
def vqa(model, preprocess, version) -> SuiteResult:
    if version.kind == "instructions":
        return _conversation_vqa(model, preprocess, version)
    asked = attribute_questions(_test_rows(version))
    if not asked:
        raise SuiteError(f"vqa: dataset {version.id}'s test split has no rows to ask about")
    answers = ask(model, preprocess, asked)
    frame = pd.DataFrame({"kind": [q.kind for _, q in asked], "held_out": [q.held_out for _, q in asked],
                          "question": [q.question for _, q in asked], "answer": [q.answer for _, q in asked],
                          "generated": answers})
    metrics, per_kind = exact_match(frame)
    frame["two_groups"] = [bool(r.get("relation")) for r, _ in asked]
    # Colour of one group is recognition; of one of two groups it needs binding colour to shape.
    colour = frame[(frame.kind == "colour") & ~frame.held_out]
    for two, name in ((False, "one_group"), (True, "two_groups")):
        if (colour.two_groups == two).any():
            metrics[f"colour_{name}_accuracy"] = float(colour[colour.two_groups == two].correct.mean())
    metrics["n"] = float((~frame.held_out).sum())
    return SuiteResult(metrics, "accuracy", tables={"per_kind": per_kind, "examples": frame.head(200)})


CONVERSATION_ANSWER_TOKENS = 32
"""New tokens allowed for an answer in a conversation (open answers run longer)."""


def _conversation_vqa(model, preprocess, version) -> SuiteResult:
    """Every turn of the test split's conversations, asked after the turns before it as the data wrote them:
    exact match after VQAv2's normalisation (vqa_normalize) and contains (the answer's words inside the
    generated text's, for open answers), per question type where the data names one (`<type>_accuracy`;
    `conversation_accuracy` for the turns that name none). A turn whose prompt leaves no room for an answer in
    the context is counted, not asked."""
    chat = ChatFormat.of(preprocess)
    asked, too_long = [], 0
    for row in rows(version, ["image", "conversations"]).to_pylist():
        turns = conversation(row)
        for k, turn in enumerate(turns):
            if len(chat.prompt(turn.question, turns[:k])) < chat.context_length:
                asked.append((row["image"], turns[:k], turn))
            else:
                too_long += 1
    if not asked:
        raise SuiteError(f"vqa: dataset {version.id}'s test split has no conversation turn that fits the model's "
                         f"context of {chat.context_length} tokens ({too_long} do not)")
    generated = generate_answers(model, preprocess, [image for image, _, _ in asked], [t.question for *_, t in asked],
                                 max_new_tokens=CONVERSATION_ANSWER_TOKENS, histories=[h for _, h, _ in asked])
    frame = pd.DataFrame({"kind": [t.kind for *_, t in asked], "held_out": False,
                          "turn": [len(h) for _, h, _ in asked],
                          "question": [t.question for *_, t in asked], "answer": [t.answer for *_, t in asked],
                          "generated": generated})
    metrics, per_kind = exact_match(frame, normalize=vqa_normalize)
    frame["contains"] = [f" {vqa_normalize(a)} " in f" {vqa_normalize(g)} "
                         for a, g in zip(frame.answer, frame.generated)]
    metrics |= {"contains_accuracy": float(frame.contains.mean()), "n": float(len(frame)),
                "n_too_long": float(too_long)}
    metrics = {k: v for k, v in metrics.items() if not k.startswith("heldout_")}  # the data names no held-out
    return SuiteResult(metrics, "accuracy", tables={"per_kind": per_kind, "examples": frame.head(200)})


_GROUP = rf"(a|an|two|three) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?"
_SCENE = re.compile(rf"{_GROUP}(?: (left of|right of|above|below) {_GROUP})?")
_COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3}


def parse_scene(caption: str) -> dict | None:
    """"an image of two red circles left of a blue square" -> the attribute columns it states."""
    match = _SCENE.search(caption.lower())
    if not match:
        return None
    n, color, shape, relation, n2, color2, shape2 = match.groups()
    return {"count": _COUNTS[n], "color": color, "shape": shape, "relation": relation,
            "count2": _COUNTS.get(n2), "color2": color2, "shape2": shape2}


def _attribute_scores(records: list[dict], generated: list[str]) -> dict[str, float]:
    keys = ("color", "shape", "count", "relation", "color2", "shape2", "count2")
    hits = {k: [] for k in keys}
    parsed = 0
    for row, text in zip(records, generated):
        scene = parse_scene(text)
        parsed += scene is not None
        for k in keys:
            if row.get(k) is not None:
                hits[k].append(scene is not None and scene[k] == row[k])
    scores = {f"{k}_accuracy": float(np.mean(v)) for k, v in hits.items() if v}
    scores["parsed_fraction"] = parsed / max(len(records), 1)
    return scores


@suite("captioning", {"generate"}, "generated captions against the test split's: CIDEr and BLEU-4, and on the "
       "sample corpus its scenes' attributes parsed back")
def captioning(model, preprocess, version) -> SuiteResult:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    records = _test_rows(version)
    if not records:
        raise SuiteError(f"captioning: dataset {version.id} has no test rows")
    generated = generate_answers(model, preprocess, [r["image"] for r in records], [CAPTION_PROMPT] * len(records),
                                 max_new_tokens=preprocess.cfg.context_length)
    references = {i: [normalize_answer(r["caption"])] for i, r in enumerate(records)}
    candidates = {i: [normalize_answer(g) or "-"] for i, g in enumerate(generated)}
    cider, _ = Cider().compute_score(references, candidates)
    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    synthetic = [(r, g) for r, g in zip(records, generated) if r.get("source") == "synthetic"]
    metrics = {"cider": float(cider), "bleu4": float(bleu[3]),
               "exact_match": float(np.mean([normalize_answer(g) == normalize_answer(r["caption"])
                                             for r, g in zip(records, generated)])),
               **(_attribute_scores([r for r, _ in synthetic], [g for _, g in synthetic]) if synthetic else {}),
               "n": float(len(records))}
    examples = pd.DataFrame({"source": [r.get("source") for r in records], "caption": [r["caption"] for r in records],
                             "generated": generated}).head(200)
    return SuiteResult(metrics, "cider", tables={"examples": examples})

