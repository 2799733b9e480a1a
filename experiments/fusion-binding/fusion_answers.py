"""What a fusion model answers to the two-group questions it gets wrong, asked on test-split scenes.

VQA scores a relation answer right or wrong; this says how it is wrong: the right axis (left/right
against above/below) with the wrong side, or the wrong axis; whether yes/no answers follow the truth;
whether the colour of one of two groups is the other group's. Questions are the seen wordings
evaluation asks (mmcore.data.synthetic.questions.questions), answered greedily through the registered model
and scored as the vqa suite scores them. With --held-out: the held-out wordings instead, on every
synthetic scene, and per question type the answers given most often (is a wrong answer another
type's answer, or a caption?).
Usage:
  python experiments/fusion-binding/fusion_answers.py --home HOME --dataset DIR [--model models:/mmpipe-fusion@candidate] [--scenes 200]
      [--held-out]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench/common.py

from common import measured, pinned_model  # noqa: E402

AXIS = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}


def answer_profile(model_uri: str, rows: list[dict]) -> dict:
    """Counts of the model's answers on two-group scenes: relation by axis and side, yes/no by truth,
    two-group colour by which group's colour."""
    from mmcore.data.synthetic.questions import questions
    from mmcore.eval.generative import ask, normalize_answer
    from mmcore.registry import load_model

    model, preprocess = load_model(model_uri)
    asked = [{q.kind: q for q in questions(row)} for row in rows]

    def answers(kind: str) -> list[tuple[dict, str, str]]:
        pairs = [(row, qs[kind]) for row, qs in zip(rows, asked) if kind in qs]
        return [(row, q.answer, normalize_answer(a)) for (row, q), a in zip(pairs, ask(model, preprocess, pairs))]

    relation = answers("relation")
    yes_no = answers("yes_no")
    colour = answers("colour")
    return {
        "relation": len(relation),
        "relation right": sum(t == a for _, t, a in relation),  # a right answer is also on the right axis
        "relation right axis": sum(AXIS.get(a) == AXIS[t] for _, t, a in relation),
        "yes/no": Counter((t, a) for _, t, a in yes_no),
        "colour": len(colour),
        "colour right": sum(t == a for _, t, a in colour),
        "colour of the other group": sum(a == row["color2"] for row, _, a in colour),
    }


def held_out_answers(model_uri: str, rows: list[dict]) -> list[str]:
    """Per question type: the held-out wording, its accuracy and the answers given most often."""
    from mmcore.data.synthetic.questions import WORDINGS as TEMPLATES, questions
    from mmcore.eval.generative import ask, normalize_answer
    from mmcore.registry import load_model

    model, preprocess = load_model(model_uri)
    pairs = [(row, q) for row in rows for q in questions(row, held_out=True) if q.kind != "caption"]
    got = [normalize_answer(a) for a in ask(model, preprocess, pairs)]
    lines = ["| type | held-out wording | right | answers given most often |", "|---|---|---|---|"]
    for kind in dict.fromkeys(q.kind for _, q in pairs):
        answered = [(q.answer, a) for (_, q), a in zip(pairs, got) if q.kind == kind]
        right = sum(t == a for t, a in answered)
        common = ", ".join(f'"{a}" {n}' for a, n in Counter(a for _, a in answered).most_common(6))
        lines.append(f"| {kind} | {TEMPLATES[kind][1][0]} | {right / len(answered):.2f} ({right} of "
                     f"{len(answered)}) | {common} |")
    return lines


def report(profile: dict) -> list[str]:
    def share(part: int, whole: int) -> str:
        return f"{part / whole:.2f} ({part} of {whole})" if whole else "-"

    yn = profile["yes/no"]
    said_yes_true, said_yes_false = yn[("yes", "yes")], yn[("no", "yes")]
    true, false = said_yes_true + yn[("yes", "no")], said_yes_false + yn[("no", "no")]
    axis = profile["relation right axis"]
    return ["| question (two-group test scenes) | measure | value |", "|---|---|---|",
            f"| relation | right answer | {share(profile['relation right'], profile['relation'])} |",
            f"| relation | right axis (left/right or above/below) | {share(axis, profile['relation'])} |",
            f"| relation | right side, of the right-axis answers | {share(profile['relation right'], axis)} |",
            f"| yes/no | 'yes' to a true statement | {share(said_yes_true, true)} |",
            f"| yes/no | 'yes' to a false statement | {share(said_yes_false, false)} |",
            f"| colour of one of two groups | right | {share(profile['colour right'], profile['colour'])} |",
            f"| colour of one of two groups | the other group's colour | "
            f"{share(profile['colour of the other group'], profile['colour'])} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="the project home whose registry holds the model")
    parser.add_argument("--dataset", required=True, help="a dataset version directory")
    parser.add_argument("--model", default="models:/mmpipe-fusion@candidate")
    parser.add_argument("--scenes", type=int, default=200, help="two-group test scenes to ask about")
    parser.add_argument("--held-out", action="store_true",
                        help="ask the held-out wordings of every question type on that many synthetic scenes")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home

    from mmcore.data.dataset import DatasetVersion

    version = DatasetVersion.open(args.dataset)
    rows = [r for r in version.read("test").to_pylist()
            if r.get("source") == "synthetic" and (args.held_out or r.get("relation"))]
    model = pinned_model(args.model)
    command = f"python experiments/fusion-binding/fusion_answers.py --home HOME --dataset DIR --model {model} --scenes {args.scenes}"
    if args.held_out:
        lines = held_out_answers(model, rows[: args.scenes])
        title, asked = "what the held-out wordings get", "synthetic"
        command += " --held-out"
    else:
        lines = report(answer_profile(model, rows[: args.scenes]))
        title, asked = "how the two-group answers go wrong", "two-group"
    print("\n".join([f"## Fusion: {title}", "", f"Command: `{command}`", "",
                      f"{model} on the first {args.scenes} {asked} scenes of the test split of dataset "
                      f"{version.id}; greedy answers to the {'held-out' if args.held_out else 'seen'} "
                      f"wordings evaluation asks.", "", *lines, "", measured()]))


if __name__ == "__main__":
    main()
