"""Recaptioning measured on the noisy sample corpus: does a contrastive model learn more from a fusion model's
captions than from the noisy originals?

On bench/datacomp.py's corpora (run in the same --home, its models and datasets are reused): a LLaVA learns to
caption on yesterday's clean corpus (seed 0, the demo-fusion recipe on yesterday's CLIP); it captions every image
of today's noisy corpus (seed 1, `mmpipe infer --output captions`, computed once); the same contrastive recipe
(steps, seed) then trains on today's corpus with (a) its own captions, (b) the generated ones instead
(`data.captioner`), (c) half each (`data.generated_share=0.5`); each is evaluated on the clean seed-1 version's
test split. Writes the table to docs/benchmarks.md ("Recaptioning").

    .venv/bin/python bench/recaption.py --home /tmp/datacomp     # after bench/datacomp.py --home /tmp/datacomp
    .venv/bin/python bench/recaption.py --recipe debug --fusion-recipe debug-fusion --synthetic 600 --digits 200
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402
from datacomp import PRIMARY, arguments, corpora, trained  # noqa: E402


def caption_scores(today, generated, scorer: str) -> dict[str, tuple[float, float]]:
    """Yesterday's CLIP score (DataComp's) of each row's own caption and of the generated one, averaged over the
    rows whose caption the noise left right and over those it made wrong (the corpus's `caption_kind`)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcore.data.filters import ModelScoreFilter
    from mmcore.registry import load_model

    score = ModelScoreFilter(*load_model(scorer))
    written = dict(zip(generated.column("key"), generated.column("generated_caption")))
    own, new, wrong = [], [], []
    for path in today.shard_paths():
        table = pq.read_table(str(path), columns=["key", "image", "caption", "caption_kind"])
        own.append(score.scores(table))
        mine = pa.array([written[key] for key in table.column("key").to_pylist()])
        new.append(score.scores(table.set_column(table.column_names.index("caption"), "caption", mine)))
        wrong += [kind in ("swapped", "off-topic") for kind in table.column("caption_kind").to_pylist()]
    own, new, wrong = np.concatenate(own), np.concatenate(new), np.array(wrong)
    return {"right": (own[~wrong].mean(), new[~wrong].mean()), "wrong": (own[wrong].mean(), new[wrong].mean())}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--fusion-recipe", default="demo-fusion", help="the captioner's recipe")
    args = parser.parse_args()
    started = time.perf_counter()
    _, yesterday, today, clean_today = corpora(args, "mmpipe-recaption-")

    from mmcore.data.dataset import DatasetVersion
    from mmcore.eval.run import evaluate
    from mmcore.infer import infer

    clip = trained(args.recipe, yesterday, "datacomp-yesterday")
    captioner = trained(args.fusion_recipe, yesterday, "recaption-captioner", f'model.parent="{clip}"')
    generated, seconds = infer(captioner, today, "captions")
    scores = caption_scores(DatasetVersion.open(today), generated, clip)
    arms = {"(a) its own captions": [], "(b) the captioner's, instead": [f'data.captioner="{captioner}"'],
            "(c) half each": [f'data.captioner="{captioner}"', "data.generated_share=0.5"]}
    results = {}
    for arm, overrides in arms.items():
        model = trained(args.recipe, today, f"datacomp-{arm[1]}" if not overrides else f"recaption-{arm[1]}",
                        *overrides)
        report = evaluate(model, clean_today, None)
        results[arm] = {f"{suite}.{key}": value for suite, metrics in report.metrics.items()
                        for key, value in metrics.items()}
    minutes = (time.perf_counter() - started) / 60
    command = (f".venv/bin/python bench/recaption.py --noise {args.noise} --recipe {args.recipe} --fusion-recipe "
               f"{args.fusion_recipe} --synthetic {args.synthetic} --digits {args.digits}"
               + (f" --home {args.home}" if args.home else ""))
    lines = ["## Recaptioning: a contrastive model on a fusion model's captions", "", f"Command: `{command}` "
             f"({minutes:.0f} min; in bench/datacomp.py's home its corpora and finished runs are reused). "
             "The captioner "
             f"({captioner}, `{args.fusion_recipe}` on the clean seed-0 corpus, on yesterday's CLIP) captioned today's "
             f"{DatasetVersion.open(today).manifest['rows']['kept']} rows in {seconds:.0f} s. Yesterday's CLIP scores "
             f"(mean cosine) the rows the noise left right {scores['right'][0]:.3f} with their own captions and "
             f"{scores['right'][1]:.3f} with the generated ones, the {args.noise:.0%} it made wrong "
             f"{scores['wrong'][0]:.3f} and {scores['wrong'][1]:.3f}. The `{args.recipe}` recipe on each arm, "
             "evaluated on the clean seed-1 version's test split.", "",
             "| arm | " + " | ".join(PRIMARY) + " |", "|---|" + "---|" * len(PRIMARY)]
    for arm, metrics in results.items():
        lines.append(f"| {arm} | " + " | ".join(f"{metrics.get(k, float('nan')):.4f}" for k in PRIMARY) + " |")
    body = "\n".join(lines)
    write_section("recaption", body)
    print(body)


if __name__ == "__main__":
    main()
