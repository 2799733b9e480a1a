"""The text suite, for language models: perplexity on the test split's captions, and answers to questions
about a caption given in text (the sample corpus's question types, seen and held-out wordings), asked in a
conversation whose first turn gave the caption as the answer to the caption request: the conversation
format the language stage trains on (data/passages.py)."""

from __future__ import annotations

import math

import pandas as pd

from mmcore.data.instruct import CAPTION_PROMPT
from mmcore.data.synthetic import questions as attributes
from mmcore.eval.contrastive import rows
from mmcore.eval.generative import ANSWER_TOKENS, attribute_questions, exact_match
from mmcore.eval.suites import SAMPLE_COLUMNS, SuiteError, SuiteResult, suite


@suite("text", {"complete"}, "caption perplexity; answers to questions about a caption given in text, exact match")
def text(model, preprocess, version) -> SuiteResult:
    extras = set(version.manifest["source"].get("extras", []))
    columns = ["caption", *[c for c in attributes.COLUMNS if c in extras]]
    records = rows(version, columns).to_pylist()
    if not records:
        raise SuiteError(f"text: dataset {version.id}'s test split has no rows")
    scored = model.text_nll([r["caption"] for r in records])
    metrics = {"perplexity": math.exp(sum(n for n, _ in scored) / max(sum(c for _, c in scored), 1)),
               "n": float(len(records))}
    asked = attribute_questions(records) if SAMPLE_COLUMNS <= extras else []
    if not asked:
        return SuiteResult(metrics, "perplexity")
    answers = model.complete([[{"role": "user", "content": CAPTION_PROMPT},
                               {"role": "assistant", "content": row["caption"]},
                               {"role": "user", "content": q.question}] for row, q in asked],
                             max_new_tokens=ANSWER_TOKENS)
    frame = pd.DataFrame({"kind": [q.kind for _, q in asked], "held_out": [q.held_out for _, q in asked],
                          "caption": [r["caption"] for r, _ in asked], "question": [q.question for _, q in asked],
                          "answer": [q.answer for _, q in asked], "generated": answers})
    answered, per_kind = exact_match(frame, overall="answer_accuracy")
    return SuiteResult(metrics | answered, "answer_accuracy",
                       tables={"per_kind": per_kind, "examples": frame.head(200)})
