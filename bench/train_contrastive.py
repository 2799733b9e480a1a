"""Contrastive training: demo-recipe throughput and quality, the data stall, and our overhead vs plain PyTorch.

1. fit() with the demo recipe (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2, streamed from the
   dataset version): wall time, steady samples/s, and retrieval recall@k on the val and test splits.
2. Data stall, in one Ray Train run: consecutive steps fed from the Ray Data stream, then the same
   number fed from batches already in memory; mean step time of each (target: within 5%).
3. The same model and global batch in a plain single-process PyTorch loop (AdamW, in-memory
   batches, all cores), against fit() with one worker using the same threads (the fair
   comparison) and with the recipe's two workers, so the cost of Ray + DeepSpeed is a measured ratio.
4. Quality: every evaluation suite on the registered model (zero-shot shapes and digits,
   retrieval, compositional probe), as `mmpipe evaluate` runs them.
Usage: python bench/train_contrastive.py [--dataset DIR] [--recipe demo] [--steps N] [--one-worker-steps 120]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_section  # noqa: E402

from mmcore.cli import apply_overrides  # noqa: E402
from mmcore.config import RunConfig, from_dict, to_dict  # noqa: E402
from mmcore.data.config import DownloadConfig, GuardConfig, IngestConfig, SourceConfig
from mmcore.recipes import recipe  # noqa: E402
from mmcore.train.parallel import worker_threads  # noqa: E402

STEPS = 60  # steps per feeding mode in the stall measurement


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


def stall_loop(config: dict) -> None:
    """Ray Train worker: alternate streamed and in-memory blocks of steps; rank 0 writes step times."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    from mmcore.data.stream import torch_batches, units_dataset
    from mmcore.data.units import rank_units
    from mmcore.tasks import build_task
    from mmcore.train.deepspeed_config import build_ds_config
    from mmcore.train.trainer import split_ids
    from mmcore.train.parallel import param_groups

    cfg = from_dict(RunConfig, config["run"])
    torch.set_num_threads(worker_threads(cfg.parallel, ray.train.get_context().get_local_world_size()))  # as fit()
    task, _ = build_task(cfg, config["model_config"], config["tokenizer_json"])
    engine, *_ = deepspeed.initialize(model=task, model_parameters=param_groups(task, 0.1),
                                      config=build_ds_config(cfg, "fp32"), dist_init_required=False)
    context = ray.train.get_context()
    units = rank_units(config["units"], context.get_world_rank(), context.get_world_size())
    stream = torch_batches(units_dataset(units, config["preprocess"], config["cpus"]), cfg.micro_batch,
                           ray.train.torch.get_device())
    cached = [split_ids(next(stream)[0])[0] for _ in range(8)]

    def step(batch):
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()

    for batch in cached:  # warm-up
        step(batch)
    times = {"stream": [], "memory": []}
    for mode in ("stream", "memory"):
        for i in range(STEPS):
            started = time.perf_counter()
            step(split_ids(next(stream)[0])[0] if mode == "stream" else cached[i % len(cached)])
            times[mode].append(time.perf_counter() - started)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(times))
    ray.train.report({})


def data_stall(cfg: RunConfig, version, tmp: Path) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmcore.data.units import work_units
    from mmcore.models import model_config
    from mmcore.models.preprocess import Preprocessor
    from mmcore.tasks import build_task
    from mmcore.train.fit import train_stream_cpus

    tokenizer_json = version.tokenizer_path.read_text()
    arch = model_config(cfg.model.name)
    _, pre = build_task(cfg, arch, tokenizer_json)
    out = tmp / "stall.json"
    trainer = TorchTrainer(
        stall_loop,
        train_loop_config={"run": to_dict(cfg), "model_config": arch, "tokenizer_json": tokenizer_json,
                           "out": str(out), "units": work_units(version, "train", 3, cfg.seed),
                           "cpus": train_stream_cpus(ray, cfg),
                           "preprocess": Preprocessor(pre, tokenizer_json).for_split("train", cfg.data.augment)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.parallel.num_workers),
        run_config=ray.train.RunConfig(name="bench-stall", storage_path=str(tmp / "ray")),
    )
    trainer.fit()
    times = json.loads(out.read_text())
    return {mode: sum(values) / len(values) for mode, values in times.items()}


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
        stall = {"whole fit": whole_fit_stall(result)}
        evaluation = quality(result, version)
        if args.recipe == "demo":
            stall.update(data_stall(cfg, version, Path(tmp)))
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
        f"{stall['whole fit']:.3f} |",
    ]
    if "plain" not in steady:
        return lines
    plain, alone = steady["plain"], steady["plain, no Ray"]
    return lines + [
        f"| step time, streamed from the dataset (mean of {STEPS} consecutive steps) | "
        f"{1000 * stall['stream']:.0f} ms |",
        f"| step time, batches already in memory (mean of {STEPS}) | {1000 * stall['memory']:.0f} ms |",
        f"| data stall in that window: streamed / in-memory step time | {stall['stream'] / stall['memory']:.3f} |",
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
