"""DataComp's measurement on the sample corpus: does filtering by the pipeline's own CLIP score help?

Yesterday's contrastive model trains on a clean corpus (seed 0). Today's corpus (seed 1) has a share of wrong
captions (`mmpipe sample make --noise`: half another row's, half page boilerplate). The same recipe (steps, seed)
then trains on (a) every noisy row, (b) the rows yesterday's model scores best (`mmpipe dataset filter`,
DataComp's top-fraction rule over its derived CLIP score), (c) a random subset of (b)'s size; each is evaluated
on the clean seed-1 version's test split (the same images with their true captions). Writes the table to
docs/benchmarks.md ("Filtering by the pipeline's own CLIP score").

    .venv/bin/python bench/datacomp.py                      # the demo recipe: about an hour on 2 cores
    .venv/bin/python bench/datacomp.py --recipe debug --synthetic 600 --digits 200   # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402

PRIMARY = ("retrieval.image_to_text_recall_5", "zeroshot-shapes.accuracy", "zeroshot-digits.accuracy",
           "compositional.accuracy")


def corpus(root: Path, name: str, url: str, spec) -> str:
    """A sample corpus made under root/name (served at url/name) and ingested: its dataset version's path (the
    one a run before ingested, when there is one)."""
    from mmcore.data.config import GuardConfig, IngestConfig, SourceConfig
    from mmcore.data.ingest import ingest
    from mmcore.data.synthetic.corpus import make_sample

    if (root / "datasets" / name / "manifest.json").exists():
        return str(root / "datasets" / name)
    url_list = make_sample(root / "corpora" / name, f"{url}/corpora/{name}", spec)
    return str(ingest(IngestConfig(source=SourceConfig(str(url_list)), out=str(root / "datasets" / name),
                                   guard=GuardConfig(allow_networks=["127.0.0.1/32"]))).path)


def trained(recipe: str, dataset: str, model_name: str, *overrides: str) -> str:
    """The recipe on `dataset` (with --set style `overrides`), registered as `model_name`: its pinned URI."""
    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe as named
    from mmcore.train.fit import fit

    return fit(apply_overrides(named(recipe, dataset), [f'tracking.model_name="{model_name}"', *overrides])).model_uri


def arguments(doc: str) -> argparse.ArgumentParser:
    """The corpora's and the recipe's arguments (this bench's and bench/recaption.py's)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--noise", type=float, default=0.3, help="share of today's rows with a wrong caption")
    parser.add_argument("--recipe", default="demo", help="the contrastive recipe every model trains with")
    parser.add_argument("--synthetic", type=int, default=8000)
    parser.add_argument("--digits", type=int, default=1797)
    parser.add_argument("--home", help="project home (default: a temporary directory)")
    return parser


def corpora(args, prefix: str) -> tuple[Path, str, str, str]:
    """(the project home, now $MMPIPE_HOME; yesterday's clean seed-0 version, today's noisy seed-1 version, its
    clean twin): made and ingested, or those a run before ingested there."""
    home = Path(args.home or tempfile.mkdtemp(prefix=prefix))
    os.environ["MMPIPE_HOME"] = str(home)
    from mmcore.data.server import FileServer
    from mmcore.data.synthetic.corpus import SampleSpec

    spec = {"synthetic": args.synthetic, "digits": args.digits, "conversations": 0}
    with FileServer(home) as server:
        return (home, corpus(home, "clean-seed0", server.url, SampleSpec(seed=0, **spec)),
                corpus(home, "noisy-seed1", server.url, SampleSpec(seed=1, noise=args.noise, **spec)),
                corpus(home, "clean-seed1", server.url, SampleSpec(seed=1, **spec)))


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--keep", type=float, default=0.7, help="the top fraction the CLIP-score filter keeps")
    args = parser.parse_args()
    started = time.perf_counter()
    home, yesterday, today, clean_today = corpora(args, "mmpipe-datacomp-")

    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.scored import filter_by_score, random_subset
    from mmcore.eval.run import evaluate
    from mmcore.infer import infer

    scorer = trained(args.recipe, yesterday, "datacomp-yesterday")
    scores, _ = infer(scorer, today, "clip-score")
    kept = filter_by_score(DatasetVersion.open(today), scores, str(home / "datasets" / "noisy-seed1-kept"),
                           top_fraction=args.keep)
    drawn = random_subset(DatasetVersion.open(today), str(home / "datasets" / "noisy-seed1-random"),
                          kept.manifest["rows"]["kept"])
    arms = {"(a) every noisy row": today, "(b) CLIP-score filtered": str(kept.path),
            "(c) random subset, (b)'s size": str(drawn.path)}
    results = {}
    for arm, dataset in arms.items():
        model = trained(args.recipe, dataset, f"datacomp-{arm[1]}")
        report = evaluate(model, clean_today, None)
        results[arm] = (DatasetVersion.open(dataset).manifest["rows"]["kept"],
                        {f"{suite}.{key}": value for suite, metrics in report.metrics.items()
                         for key, value in metrics.items()})
    minutes = (time.perf_counter() - started) / 60
    command = (f".venv/bin/python bench/datacomp.py --noise {args.noise} --keep {args.keep} --recipe {args.recipe} "
               f"--synthetic {args.synthetic} --digits {args.digits}" + (f" --home {args.home}" if args.home else ""))
    lines = ["## Filtering by the pipeline's own CLIP score (DataComp's measurement)", "", f"Command: `{command}` "
             f"({minutes:.0f} min). Yesterday's model: {scorer}, on a clean corpus (seed 0); today's corpus (seed 1) "
             f"with {args.noise:.0%} wrong captions; the `{args.recipe}` recipe on each arm; evaluated on the clean "
             "seed-1 version's test split.", "",
             "| arm | rows | " + " | ".join(PRIMARY) + " |", "|---|---|" + "---|" * len(PRIMARY)]
    for arm, (rows, metrics) in results.items():
        lines.append(f"| {arm} | {rows} | " + " | ".join(f"{metrics.get(k, float('nan')):.4f}" for k in PRIMARY)
                     + " |")
    body = "\n".join(lines)
    write_section("datacomp", body)
    print(body)


if __name__ == "__main__":
    main()
