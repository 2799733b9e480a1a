"""The questions the sample corpus's attribute columns answer: their types, their wordings (seen in
training and evaluation, or held out for evaluation only) and their answers.

The corpus's conversation file asks them in seen wordings (`training_questions`, corpus.write_conversations),
and training reads them from there as it reads a user's; the vqa and text suites ask them, in seen and
held-out wordings (`questions`), of a dataset that has these columns.
"""

from __future__ import annotations

from mmcore.data.instruct import CAPTION_TEMPLATES, Question, row_rng
from mmcore.data.synthetic.corpus import DIGIT_WORDS, OPPOSITE

COLUMNS = ["source", "label", "shape", "color", "count", "relation", "shape2", "color2", "count2"]
"""The corpus's columns the questions are made from."""

# question type -> (seen templates, held-out templates). {first}/{second}: "the red circle(s)";
# {be}: is/are to agree with {first}.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (("what colour is the {shape}?", "which colour does the {shape} have?", "the {shape} is what colour?",
                "what is the colour of the {shape}?", "which colour is the {shape} drawn in?",
                "say which colour the {shape} is.", "describe the colour of the {shape}.",
                "what colour has the {shape} shape?"),
               ("name the colour of the {shape}.",)),
    "shape": (("which shape is drawn in {color}?", "what is the shape of the {color} object?",
               "which shape is {color}?", "what shape does the {color} object have?",
               "the {color} object is which shape?", "say which shape is {color}.",
               "describe the shape of the {color} object.", "which shape has the colour {color}?"),
              ("name the shape coloured {color}.",)),
    "count": (("how many {color} {shapes} are there?", "count the {color} {shapes}.",
               "what is the number of {color} {shapes}?", "how many {shapes} are {color}?",
               "give the number of {color} {shapes}.", "how many {color} {shapes} does the image show?",
               "describe how many {color} {shapes} there are.", "how many {color} {shapes} are in the picture?"),
              ("how many {color} {shapes} can you see?",)),
    "relation": (("where {be} {first} relative to {second}?", "how {be} {first} placed relative to {second}?",
                  "what is the position of {first} relative to {second}?",
                  "relative to {second}, where {be} {first}?", "say where {first} {be} relative to {second}.",
                  "in which direction from {second} {be} {first}?",
                  "describe the position of {first} relative to {second}.",
                  "give the direction from {second} to {first}."),
                 ("describe where {first} {be} compared with {second}.",)),
    "yes_no": (("{be} {first} {relation} {second}?", "is it true that {first} {be} {relation} {second}?",
                "answer yes or no: {be} {first} {relation} {second}?", "{first} {be} {relation} {second}: yes or no?",
                "{be} {first} placed {relation} {second}?", "does the image show {first} {relation} {second}?",
                "say whether {first} {be} {relation} {second}.", "does the picture show {first} {relation} {second}?"),
               ("would you say {first} {be} {relation} {second}?",)),
    "digit": (("which digit is this?", "what number is written here?", "what digit is shown?",
               "which number does the image show?", "read the digit in the image.", "what is this digit?",
               "describe the digit.", "which digit does the picture show?"),
              ("name the handwritten digit.",)),
}
"""Each type has seen wordings that open like another type's (or a caption request's: "describe ...") or
carry another type's word ("... has the colour red"), so that no single word decides the type; the
held-out wordings use words no seen question has ("name", "can you see", "compared with", "would you
say", "coloured", "handwritten")."""
OPENINGS = ("look: ", "so, ", "here: ")
CLOSINGS = (" in short.", " one word.")
ONE_WORD = ("colour", "shape", "count", "digit")
"""Training only: half of the questions of ONE_WORD types open with one of OPENINGS and a third close
with one of CLOSINGS, so that words around a question do not decide its type (captions and the
two-group questions are too long to leave room in the context)."""
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
ANSWERS = {"digit": lambda row: DIGIT_WORDS[int(row["label"])], "colour": lambda row: row["color"],
           "shape": lambda row: row["shape"], "count": lambda row: COUNT_WORDS[row["count"]],
           "relation": lambda row: row["relation"]}
"""question type -> the answer, from the row's columns (yes_no's depends on the relation asked)."""


def kinds(row: dict) -> list[str]:
    """The question types a row can answer, in a fixed order."""
    found = []
    if row.get("source") == "sklearn-digits" and row.get("label") in [str(d) for d in range(10)]:
        found.append("digit")
    if row.get("source") != "synthetic" or not row.get("shape"):
        return found
    if not row.get("relation") or row["shape"] != row["shape2"]:
        found.append("colour")  # with two groups of one shape, "the circle" would be ambiguous
    found += ["shape", "count"]
    return found + (["relation", "yes_no"] if row.get("relation") else [])


WORDINGS = {"caption": CAPTION_TEMPLATES, **TEMPLATES}
"""Every question type the corpus asks, the caption request first: (seen, held-out) wordings."""


def questions(row: dict, held_out: bool = False) -> list[Question]:
    """A row's questions for evaluation: one per type the row can answer, the caption request first, worded by
    a seen (or a held-out) template chosen by the row."""
    rng = row_rng(row, 7, int(held_out))
    out = []
    for kind in ["caption", *kinds(row)]:
        truth = bool(rng.random() < 0.5) if kind == "yes_no" else True
        out.append(_question(kind, str(rng.choice(WORDINGS[kind][1 if held_out else 0])), row, truth, held_out))
    return out


def training_questions(row: dict, seed: int, epoch: int) -> list[Question]:
    """A row's questions for its conversation file: every type the row can answer, in an order drawn from
    (seed, epoch, key), each worded by a seen template drawn the same way, with or without an opening and a
    closing (OPENINGS)."""
    rng = row_rng(row, seed, epoch)
    every = ["caption", *kinds(row)]
    out = []
    for kind in (every[i] for i in rng.permutation(len(every))):
        template = str(rng.choice(WORDINGS[kind][0]))
        if kind in ONE_WORD:
            template = (str(rng.choice(OPENINGS)) if rng.random() < 0.5 else "") + template
            template += str(rng.choice(CLOSINGS)) if rng.random() < 1 / 3 else ""
        out.append(_question(kind, template, row, truth=bool(rng.random() < 0.5) if kind == "yes_no" else True))
    return out


def _question(kind: str, template: str, row: dict, truth: bool, held_out: bool = False) -> Question:
    question, answer = (template, row["caption"]) if kind == "caption" else ask(kind, template, row, truth)
    return Question(kind, question, answer, held_out)


def ask(kind: str, template: str, row: dict, truth: bool) -> tuple[str, str]:
    """(question, answer) of `kind` worded by `template`; a yes/no question asks the true relation or its
    opposite."""
    if kind == "yes_no":
        asked = row["relation"] if truth else OPPOSITE[row["relation"]]
        return _fill(template, row, asked), "yes" if truth else "no"
    return template if kind == "digit" else _fill(template, row), ANSWERS[kind](row)


def _group(color: str, shape: str, count: int) -> str:
    return f"the {color} {shape}{'s' if count > 1 else ''}"


def _fill(template: str, row: dict, relation: str | None = None) -> str:
    first = _group(row["color"], row["shape"], row["count"] or 1)
    second = _group(row["color2"], row["shape2"], row["count2"] or 1) if row.get("relation") else ""
    return template.format(shape=row["shape"], shapes=f"{row['shape']}s", color=row["color"], first=first,
                           second=second, be="are" if (row["count"] or 1) > 1 else "is",
                           relation=relation or row.get("relation"))
