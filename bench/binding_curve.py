"""The binding curve: what a language parent buys the fusion stage, as accuracy against fusion steps.

LLaVA (the demo-fusion recipe) on the same vision tower, data and seed, its LM either trained from scratch
on the dataset's tokenizer or started from a language parent (model.lm_parent, trained whole). One run per
step budget, each with the recipe's whole schedule (warm-up, cosine) over its steps, in one process through
the project's trainer; every model is registered (as `bench-binding`, alias ARM-STEPS) and scored by
`mmpipe evaluate`'s vqa and compositional suites on the test split. The table goes to docs/benchmarks.md.
Usage: python bench/binding_curve.py --home HOME --dataset DIR --tower models:/mmpipe-contrastive/1
           --lm-parent models:/mmpipe-language/1 [--steps 100 200 400]
HOME holds the registered tower and language parent (an MMPIPE_HOME after `mmpipe demo` and
`mmpipe train language`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import pinned_model, write_section  # noqa: E402

COLUMNS = [("vqa", "accuracy", "vqa"), ("vqa", "heldout_accuracy", "held-out"),
           ("vqa", "relation_accuracy", "relation"), ("vqa", "yes_no_accuracy", "yes/no"),
           ("vqa", "colour_two_groups_accuracy", "colour of one of two"), ("vqa", "shape_accuracy", "shape"),
           ("vqa", "count_accuracy", "count"), ("vqa", "digit_accuracy", "digits"),
           ("compositional", "accuracy", "compositional")]


def train_and_score(dataset: str, tower: str, lm_parent: str, steps: int, alias: str) -> tuple[dict, float]:
    """One demo-fusion run of `steps` steps, registered under `alias` and evaluated -> (metrics, wall s)."""
    from mmcore.cli import apply_overrides
    from mmcore.eval.run import evaluate
    from mmcore.recipes import recipe
    from mmcore.train.fit import fit

    cfg = apply_overrides(recipe("demo-fusion", dataset), [
        "cluster.executor=here", "parallel.num_workers=1", f"model.parent={tower}", f"model.lm_parent={lm_parent}",
        f"optim.max_steps={steps}", f"optim.warmup_steps={min(50, steps // 8)}",
        f"checkpoint.every_steps={steps}", "tracking.model_name=bench-binding", f"tracking.alias={alias}"])
    started = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - started
    report = evaluate(result.model_uri, dataset, suites=["vqa", "compositional"])
    return report.metrics, wall


def table(rows: list[tuple[str, int, dict, float]]) -> str:
    head = "| LM | steps | " + " | ".join(label for _, _, label in COLUMNS) + " | training + start (s) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for arm, steps, metrics, wall in rows:
        values = [metrics.get(suite, {}).get(key) for suite, key, _ in COLUMNS]
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        lines.append(f"| {arm} | {steps or '-'} | " + " | ".join(cells) + f" | {f'{wall:.0f}' if wall else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="MMPIPE_HOME holding the tower and the language parent")
    parser.add_argument("--dataset", required=True, help="the dataset version both arms train and are scored on")
    parser.add_argument("--tower", required=True, help="the vision parent (a contrastive model's URI)")
    parser.add_argument("--lm-parent", required=True, help="the language parent (a language model's URI)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400], help="fusion step budgets")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = str(Path(args.home).expanduser().resolve())
    tower, lm_parent = pinned_model(args.tower), pinned_model(args.lm_parent)
    arms = [("from scratch", ""), (f"language parent ({lm_parent})", lm_parent)]
    from mmcore.eval.run import evaluate

    rows = [(f"(the tower, {tower})", 0, evaluate(tower, args.dataset, suites=["compositional"]).metrics, 0.0)]
    for arm, parent in arms:
        for steps in args.steps:
            alias = f"{'lm' if parent else 'scratch'}-{steps}"
            metrics, wall = train_and_score(args.dataset, tower, parent, steps, alias)
            rows.append((arm, steps, metrics, wall))
            print(table(rows), flush=True)
    command = (f"`.venv/bin/python bench/binding_curve.py --home HOME --dataset DIR --tower {tower} "
               f"--lm-parent {lm_parent} --steps {' '.join(map(str, args.steps))}`")
    body = f"""## The binding curve: LLaVA with and without a language parent (demo-fusion recipe, CPU)

Command: {command} (DIR: the full sample corpus ingested; HOME: its demo contrastive model as the tower and
the `demo-language` model as the language parent)

{table(rows)}

Same tower, data, seed and recipe (questions packed, 64 a step, the tower frozen); each row is its own run
with the whole schedule over its steps, trained in one process (`cluster.executor=here`), registered and
scored by `mmpipe evaluate` (vqa: seen wordings unless held-out; compositional: the true caption scored
above the same words with attributes or the relation swapped; the first row is the contrastive tower's own).
"""
    kwargs = {"doc": args.out} if args.out else {}
    write_section("binding-curve", body, **kwargs)


if __name__ == "__main__":
    main()
