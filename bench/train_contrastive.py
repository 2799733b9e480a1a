"""Contrastive training: demo-recipe throughput and quality, the data stall, and our overhead vs plain PyTorch.

1. fit() with the demo recipe (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2, streamed from the
   dataset version): wall time, steady samples/s, final losses.
2. Data stall: over the whole fit(), training time against training time not spent waiting for data,
   from the data_wait_fraction fit() itself logs (target: within 5%).
3. The same model and global batch in a plain single-process PyTorch loop (AdamW, in-memory
   batches, all cores): the loop a user would write instead, and the one training loop kept outside
   mmcore/train on purpose. Against fit() with one worker using the same threads (the fair
   comparison) and with the recipe's two workers, so the cost of Ray + DeepSpeed is a measured ratio.
4. Quality: every evaluation suite on the registered model (zero-shot shapes and digits,
   retrieval, compositional probe), as `mmpipe evaluate` runs them.
Usage: python bench/train_contrastive.py [--dataset DIR] [--recipe demo] [--steps N] [--one-worker-steps 120]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_section  # noqa: E402

from mmcore.cli import apply_overrides  # noqa: E402
from mmcore.config import RunConfig  # noqa: E402
from mmcore.data.config import DownloadConfig, GuardConfig, IngestConfig, SourceConfig
from mmcore.recipes import recipe  # noqa: E402
from mmcore.train.parallel import worker_threads  # noqa: E402


def sample_dataset(root: Path, image_size: int = 64):
    """The sample corpus served on loopback and ingested, its images stored `image_size` pixels wide."""
    from mmcore.data.ingest import ingest
    from mmcore.data.synthetic.corpus import make_sample
    from mmcore.data.server import FileServer

    with FileServer(root / "corpus") as server:
        url_list = make_sample(root / "corpus", server.url)
        return ingest(IngestConfig(source=SourceConfig(str(url_list)), out=str(root / "dataset"),
                                   guard=GuardConfig(allow_networks=["127.0.0.1/32"]),
                                   download=DownloadConfig(image_size=image_size)))


def quality(result, version):
    """Every contrastive suite, run the way users run them: evaluate() on the registered model."""
    from mmcore.eval.run import evaluate

    return evaluate(result.model_uri, str(version.path))


def history(result, name: str) -> list[tuple[int, float]]:
    """A metric's logged windows of a fit() run: (step at the window's end, value), in step order."""
    from mlflow.tracking import MlflowClient

    from mmcore import tracking
    from mmcore.config import TrackingConfig

    return sorted((m.step, m.value) for m in
                  MlflowClient(tracking.resolve_uri(TrackingConfig())).get_metric_history(result.mlflow_run_id, name))


def logged(result, name: str, first: bool = False) -> list[float]:
    """A metric's logged values, in step order, without the first window (it holds start-up) unless `first`."""
    return [value for _, value in history(result, name)][0 if first else 1:]


def steady_samples_per_second(result) -> float:
    """Samples / time over the windows after the first (equal-size windows: the harmonic mean)."""
    rates = logged(result, "samples_per_second")
    return len(rates) / sum(1 / r for r in rates)


def whole_fit_stall(result) -> float:
    """Training time / training time not spent waiting for data, over every logged window (the first,
    with the stream's start, too). Windows hold equal step counts, so a window lasts 1 / its rate."""
    rates = logged(result, "samples_per_second", first=True)
    waits = logged(result, "data_wait_fraction", first=True)
    durations = [1 / r for r in rates]
    return sum(durations) / sum(d * (1 - w) for d, w in zip(durations, waits))


def plain_pytorch(cfg: RunConfig, version, steps: int = 30) -> float:
    """samples/s of the same model and global batch, one process, no Ray, no DeepSpeed."""
    import torch

    from mmcore.models import model_config
    from mmcore.models.preprocess import Preprocessor
    from mmcore.tasks import build_task

    torch.set_num_threads(worker_threads(cfg.parallel, 1))  # the one-worker fit()'s threads: equal by construction
    tokenizer_json = version.tokenizer_path.read_text()
    task, pre = build_task(cfg, model_config(cfg.model.name), tokenizer_json)
    preprocess = Preprocessor(pre, tokenizer_json)
    table = version.read("train", columns=["image", "caption", "key", "url", "split"])
    batch_size = cfg.data.batch_size
    batches = []
    for start in range(0, batch_size * 4, batch_size):
        part = table.slice(start, batch_size)
        arrays = preprocess({"image": part.column("image").to_pylist(), "caption": part.column("caption").to_pylist()})
        batches.append({k: torch.from_numpy(v) for k, v in arrays.items()})
    optimizer = torch.optim.AdamW(task.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    times = []
    for i in range(steps + 5):
        started = time.perf_counter()
        loss = task(batches[i % len(batches)])["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        if i >= 5:
            times.append(time.perf_counter() - started)
    return batch_size / median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a dataset version (default: ingest the sample corpus into a temp dir)")
    parser.add_argument("--recipe", default="demo",
                        help="demo: every measurement; another recipe (e.g. quality): its fit() and quality only")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--one-worker-steps", type=int, default=120, help="steps of the one-worker fit()")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    from mmcore.data.dataset import DatasetVersion
    from mmcore.train.fit import fit

    steady: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMPIPE_HOME"] = str(Path(tmp) / "home")
        version = DatasetVersion.open(args.dataset) if args.dataset else sample_dataset(Path(tmp))
        cfg = recipe(args.recipe, str(version.path))
        if args.steps:
            cfg = apply_overrides(cfg, [f"optim.max_steps={args.steps}"])
        if args.recipe == "demo":  # before fit() starts the local Ray: the loop a user runs without one
            steady["plain, no Ray"] = plain_pytorch(cfg, version)
        started = time.perf_counter()
        result = fit(cfg)
        wall = time.perf_counter() - started
        steady[cfg.parallel.num_workers] = steady_samples_per_second(result)
        stall = whole_fit_stall(result)
        evaluation = quality(result, version)
        if args.recipe == "demo":
            one = fit(apply_overrides(cfg, ["parallel.num_workers=1", f"optim.max_steps={args.one_worker_steps}",
                                            f"checkpoint.every_steps={args.one_worker_steps}"]))
            steady[1] = steady_samples_per_second(one)
            steady["plain"] = plain_pytorch(cfg, version)
    lines = [f"## Contrastive training ({args.recipe} recipe, CPU)", "", f"Command: {command(args)}", "",
             f"Dataset: {'the sample corpus ingested through loopback HTTP' if not args.dataset else version.id} "
             f"({version.manifest['splits']}), model `{cfg.model.name}`, global batch {cfg.data.batch_size}, "
             f"{cfg.optim.max_steps} steps, {cfg.parallel.num_workers} Ray Train workers, DeepSpeed "
             f"ZeRO-{cfg.parallel.zero_stage}, fp32, gloo.", ""]
    lines += measures(args, cfg, result, wall, steady, stall) + [""] + quality_table(evaluation)
    body = "\n".join(lines)
    print(body)
    section = "train-contrastive" if args.recipe == "demo" else f"train-contrastive-{args.recipe}"
    write_section(section, body, **({"doc": args.out} if args.out else {}))


def command(args) -> str:
    flags = ([f"--recipe {args.recipe}"] if args.recipe != "demo" else []) + \
        ([f"--steps {args.steps}"] if args.steps else []) + \
        ([f"--one-worker-steps {args.one_worker_steps}"] if args.one_worker_steps != 120 else [])
    return "`" + " ".join([".venv/bin/python bench/train_contrastive.py", *flags]) + "`"


def measures(args, cfg, result, wall, steady, stall) -> list[str]:
    workers, threads = cfg.parallel.num_workers, worker_threads(cfg.parallel, 1)
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| fit() wall time (Ray start, workers, {cfg.optim.max_steps} steps, validation, registration) | "
        f"{wall:.0f} s |",
        f"| training throughput, {workers} workers (logged windows after the first) | "
        f"{steady[workers]:.0f} samples/s |",
        f"| final train loss / val loss (chance: ln {cfg.data.batch_size} = "
        f"{math.log(cfg.data.batch_size):.2f}) | "
        f"{result.metrics['loss']:.2f} / {result.metrics['val_loss']:.2f} |",
        f"| data stall over the whole fit(): training time / time not waiting for data (target <= 1.05) | "
        f"{stall:.3f} |",
    ]
    if "plain" not in steady:
        return lines
    plain, alone = steady["plain"], steady["plain, no Ray"]
    return lines + [
        f"| plain PyTorch loop, same model and batch, 1 process x {threads} threads, beside the local Ray the fits "
        f"left running (idle) | {plain:.0f} samples/s |",
        f"| the same loop before any Ray was started | {alone:.0f} samples/s |",
        f"| fit(), 1 worker x {threads} threads ({args.one_worker_steps} steps, logged windows after the first) | "
        f"{steady[1]:.0f} samples/s |",
        f"| ours / plain PyTorch, 1 worker, equal threads (target >= 0.90) | {steady[1] / plain:.2f} |",
        f"| ours / plain PyTorch, {workers} workers x {worker_threads(cfg.parallel, workers)} thread(s) (the recipe's "
        f"setting) | {steady[workers] / plain:.2f} |",
        f"| ours / the plain loop without Ray, 1 worker; {workers} workers | {steady[1] / alone:.2f}; "
        f"{steady[workers] / alone:.2f} |",
    ]


def quality_table(evaluation) -> list[str]:
    lines = [
        "Quality of the registered model on the test split (`mmpipe evaluate`; the baseline later stages must "
        "beat). Image->text ranks the distinct captions of the split, and a caption is right when its text equals "
        "the image's caption; text->image ranks every image, right when its caption equals the query; chance is "
        "computed the same way:",
        "",
        "| suite | metric | value | chance |",
        "|---|---|---|---|",
    ]
    m = evaluation.metrics
    table_rows = [(name, label, m[name]["accuracy"], m[name]["chance"]) for name, label in (
        ("zeroshot-shapes", "accuracy (colour + shape, single-group scenes)"),
        ("zeroshot-shapes-heldout", "the same, prompts worded unlike any corpus caption"),
        ("zeroshot-digits", "accuracy (held-out scikit-learn digits)"),
        ("zeroshot-digits-heldout", "the same, prompts worded unlike any corpus caption"))]
    for k in (1, 5, 10):
        for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
            table_rows.append(("retrieval", f"{label} R@{k}", m["retrieval"][f"{direction}_recall_{k}"],
                               m["retrieval"][f"chance_{direction}_recall_{k}"]))
    for key, label in (("swap_attributes_accuracy", "true caption over colours-swapped foil"),
                       ("swap_relation_accuracy", "true caption over relation-reversed foil"),
                       ("accuracy", "mean of the two")):
        table_rows.append(("compositional", label, m["compositional"][key], 0.5))
    lines += [f"| {suite_name} | {label} | {value:.3f} | {chance:.3f} |" for suite_name, label, value, chance in table_rows]
    lines += ["", f"Test rows: retrieval {int(m['retrieval']['n'])}, zero-shot shapes {int(m['zeroshot-shapes']['n'])}, "
                  f"digits {int(m['zeroshot-digits']['n'])}, compositional {int(m['compositional']['n'])}."]
    return lines


if __name__ == "__main__":
    main()
