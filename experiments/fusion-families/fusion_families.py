"""Fusion stage: LLaVA and Flamingo trained with their demo recipes on the same contrastive parent.

For each family: fit() (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2, frozen parent tower),
steady samples/s and LM positions/s, parameters (all and trainable), and every generative suite
(vqa, captioning, compositional) on the registered model, as `mmpipe evaluate` runs them.
Usage:
  python experiments/fusion-families/fusion_families.py   # everything in a temp home: sample corpus,
                                                        # contrastive demo, then both families
  python experiments/fusion-families/fusion_families.py --home ~/.mmpipe --dataset DIR   # on that home's contrastive champion
  python experiments/fusion-families/fusion_families.py ... --families llava --steps 1500   # a longer trial
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench/common.py

from common import measured  # noqa: E402
from train_contrastive import sample_dataset, steady_samples_per_second  # noqa: E402

from mmcore.recipes import recipe  # noqa: E402

FAMILIES = {"llava": "demo-fusion", "flamingo": "demo-flamingo"}
SHOWN = [("vqa", "accuracy"), ("vqa", "colour_one_group_accuracy"), ("vqa", "colour_two_groups_accuracy"),
         ("vqa", "shape_accuracy"), ("vqa", "count_accuracy"), ("vqa", "relation_accuracy"),
         ("vqa", "yes_no_accuracy"), ("vqa", "digit_accuracy"), ("vqa", "heldout_accuracy"),
         ("captioning", "cider"), ("captioning", "bleu4"), ("captioning", "relation_accuracy"),
         ("compositional", "accuracy")]


def champion(dataset: str) -> str:
    """models:/mmpipe-contrastive@champion of the current home, trained (demo recipe) if there is none."""
    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig
    from mmcore.train.fit import fit

    uri = tracking.resolve_uri(TrackingConfig())
    if registry.alias_version("mmpipe-contrastive", "champion", uri) is None:
        result = fit(recipe("demo", dataset))
        registry.set_alias("mmpipe-contrastive", "champion", result.model_version, uri)
    return f"models:/mmpipe-contrastive/{registry.alias_version('mmpipe-contrastive', 'champion', uri)}"


def describe(parent: str) -> str:
    """What the parent is: its recipe and its compositional probe (from its evaluation run), read from the registry."""
    from mlflow.tracking import MlflowClient

    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig

    uri = tracking.resolve_uri(TrackingConfig())
    client = MlflowClient(uri)
    found = client.get_model_version(*registry.resolve_version(parent, uri))
    params = client.get_run(found.run_id).data.params
    evaluation = (found.tags or {}).get("eval.run_id")
    scores = client.get_run(evaluation).data.metrics if evaluation else {}
    probe = f", compositional probe {scores['compositional.accuracy']:.3f}" if "compositional.accuracy" in scores else ""
    return (f"the `{params['recipe']}` recipe, {params['optim.max_steps']} steps of {params['data.batch_size']}"
            f"{probe}")


def run_seconds(result) -> float:
    """The MLflow run's duration: fit() from tracking start to registration."""
    from mlflow.tracking import MlflowClient

    from mmcore import tracking
    from mmcore.config import TrackingConfig

    info = MlflowClient(tracking.resolve_uri(TrackingConfig())).get_run(result.mlflow_run_id).info
    return (info.end_time - info.start_time) / 1000


def parameters(model_uri: str) -> tuple[int, int]:
    """(all, trainable) parameters of the registered model, trainable as the recipe trained it (frozen tower)."""
    from mmcore.registry import load_model

    model = load_model(model_uri)[0]
    total = sum(p.numel() for p in model.parameters())
    return total, total - sum(p.numel() for p in model.visual.parameters())


def run_family(family: str, dataset: str, steps: int = 0, overrides: list[str] = ()) -> dict:
    from mmcore.cli import apply_overrides
    from mmcore.eval.run import evaluate
    from mmcore.models import model_config
    from mmcore.train.fit import fit

    cfg = apply_overrides(recipe(FAMILIES[family], dataset), list(overrides))
    cfg.optim.max_steps = steps or cfg.optim.max_steps
    result = fit(cfg)  # a run finished before (same recipe, dataset and parent) is returned as it is
    arch = model_config(cfg.model.name)
    positions = cfg.data.pack_length or arch["lm"]["context_length"]
    if family == "llava":  # the image's tokens sit in the LM's sequence
        from mmcore.registry import load_model

        positions += load_model(result.model_uri)[0].extra_positions
    total, trainable = parameters(result.model_uri)
    rate = steady_samples_per_second(result)
    return {"family": family, "recipe": cfg.recipe, "model": cfg.model.name, "steps": cfg.optim.max_steps,
            "batch": cfg.data.batch_size, "wall": run_seconds(result), "samples_per_second": rate,
            "questions": result.metrics.get("questions_per_image", 1.0),
            # with task.question_loss, the answers' part of the loss
            "loss": result.metrics.get("answer_loss", result.metrics["loss"]),
            "positions_per_second": rate * positions, "positions": positions, "params": total,
            "trainable": trainable, "parent": result.model_uri,
            "report": evaluate(result.model_uri, dataset)}


def table(runs: list[dict]) -> list[str]:
    head = "| | " + " | ".join(f"{r['family']} (`{r['model']}`)" for r in runs) + " |"
    rows = [head, "|---|" + "---|" * len(runs)]

    def row(name, values):
        rows.append(f"| {name} | " + " | ".join(values) + " |")

    row("recipe", [f"`{r['recipe']}`: {r['steps']} steps of {r['batch']}" for r in runs])
    row("parameters (trainable)", [f"{r['params'] / 1e6:.2f} M ({r['trainable'] / 1e6:.2f} M)" for r in runs])
    row("fit() run time (MLflow run)", [f"{r['wall']:.0f} s" for r in runs])
    row("samples/s (steady; a sample is an image and its questions)", [f"{r['samples_per_second']:.0f}" for r in runs])
    row("questions per sample (`data.pack_length`)", [f"{r['questions']:.2f}" for r in runs])
    row("questions/s", [f"{r['samples_per_second'] * r['questions']:.0f}" for r in runs])
    row("LM positions per sample", [str(r["positions"]) for r in runs])
    row("LM positions/s", [f"{r['positions_per_second']:.0f}" for r in runs])
    row("final train loss (answer tokens)", [f"{r['loss']:.3f}" for r in runs])
    for suite, key in SHOWN:
        row(f"{suite}.{key}", [_fmt(r["report"].metric(f"{suite}.{key}")) for r in runs])
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="a project home with a contrastive champion (default: a temp one)")
    parser.add_argument("--dataset", help="its dataset version (needed with --home)")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every family's recipe, as `mmpipe train --set`")
    args = parser.parse_args()
    if bool(args.home) != bool(args.dataset):
        parser.error("--home and --dataset go together")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMPIPE_HOME"] = args.home or str(Path(tmp) / "home")
        dataset = args.dataset or str(sample_dataset(Path(tmp)).path)
        parent = champion(dataset)
        runs = [run_family(family, dataset, args.steps, args.set) for family in args.families]
    command = ".venv/bin/python experiments/fusion-families/fusion_families.py" + (" --home HOME --dataset DIR" if args.home else "")
    command += "" if args.families == list(FAMILIES) else " --families " + " ".join(args.families)
    command += f" --steps {args.steps}" if args.steps else ""
    command += "".join(f" --set {item}" for item in args.set)
    lines = ["## Fusion stage: LLaVA and Flamingo (demo recipes, CPU)", "", f"Command: `{command}`", "",
             f"Both on the frozen tower of {parent} (the home's contrastive champion: {describe(parent)}), 2 Ray Train workers, DeepSpeed "
             "ZeRO-2, fp32; quality on the test split from `evaluate()` on the registered model (held-out "
             "wordings: `heldout_accuracy`). Chance: colour 1/6, shape 1/3, count 1/3, relation 1/4, yes/no "
             "1/2, digit 1/10, compositional 1/2.", ""] + table(runs) + ["", measured()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
