"""Side by side with open_clip: the demo recipe trained by our fit() and by open_clip's code, one process each.

1. open_clip 3.3.0 (bench/openclip_side.py, run in .venv-openclip): a CLIP with clip-demo's architecture,
   built from an open_clip model config, trained with open_clip's ClipLoss on the dataset version's train
   split with the same global batch, steps, AdamW settings, lr schedule, grad clipping and fp32; a torch
   DataLoader decodes in worker processes, as open_clip's CsvDataset does.
2. Ours: fit() with the demo recipe on one Ray Train worker (DeepSpeed ZeRO-2, fp32), streamed from the
   same dataset version by Ray Data: wall time, steady samples/s and per-window train loss (MLflow history).
   Throughput target: ours / open_clip >= 1.0. Both count samples / time after the first 10 steps.
3. Parity: our ClipLoss / SigLipLoss against open_clip's (values and gradients, float32 and float64), and
   our model against open_clip's with the same weights copied in (the embeddings).
Usage: python bench/vs_openclip.py [--dataset DIR] [--steps N] [--set FIELD=VALUE ...]
(`make bench-openclip` builds .venv-openclip, then runs this with the defaults.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_section  # noqa: E402
from train_contrastive import history, sample_dataset, steady_samples_per_second  # noqa: E402

from mmcore.cli import apply_overrides  # noqa: E402
from mmcore.config import RunConfig, to_dict  # noqa: E402
from mmcore.recipes import recipe  # noqa: E402
from mmcore.train.fit import local_ray_cpus  # noqa: E402
from mmcore.train.parallel import worker_threads  # noqa: E402

if TYPE_CHECKING:
    from mmcore.data.dataset import DatasetVersion

OPENCLIP_PYTHON = HERE.parent / ".venv-openclip" / "bin" / "python"
DEFAULT_STEPS = recipe("demo", "").optim.max_steps
SKIPPED_STEPS = 10  # our first logged window (steps 1-10) holds start-up; openclip_side.py skips as many


def openclip_side(args: list[str], out: Path, result: str) -> tuple[dict, float]:
    """Run bench/openclip_side.py with .venv-openclip's python: its JSON result and the process's wall time."""
    started = time.perf_counter()
    subprocess.run([str(OPENCLIP_PYTHON), str(HERE / "openclip_side.py"), *args, "--out", str(out)], check=True)
    return json.loads((out / result).read_text()), time.perf_counter() - started


def loader_workers(cfg: RunConfig) -> int:
    """open_clip's DataLoader workers: as many decode processes as fit() can run Ray Data tasks at once
    (each training worker holds one of the local Ray's logical CPUs; Ray Data's map tasks get the rest)."""
    return local_ray_cpus(cfg.cluster.num_cpus) - cfg.parallel.num_workers


def window_means(losses: list[float], ends: list[int]) -> list[float]:
    """Per-step losses (step 1 first) averaged over the windows (previous end, end]."""
    starts = [0] + ends[:-1]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(starts, ends)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a dataset version (default: ingest the sample corpus into a temp dir)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="optimizer steps of both runs (default: the demo recipe's, %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the demo recipe for both runs, e.g. data.batch_size=32")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    if not OPENCLIP_PYTHON.exists():
        raise SystemExit(f"{OPENCLIP_PYTHON.parent.parent} missing: run make bench-openclip")
    if args.steps <= SKIPPED_STEPS:
        raise SystemExit(f"--steps {args.steps}: throughput counts the steps after the first {SKIPPED_STEPS}; "
                         f"give at least {SKIPPED_STEPS + 1}")
    from mmcore.data.dataset import DatasetVersion
    from mmcore.train.fit import fit

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMPIPE_HOME"] = str(Path(tmp) / "home")
        version = DatasetVersion.open(args.dataset) if args.dataset else sample_dataset(Path(tmp))
        # One worker, so both sides are one training process; parallel.threads_per_worker's default (the node's
        # cores / its workers) gives it every core, as open_clip's loop has.
        cfg = apply_overrides(recipe("demo", str(version.path)),
                              [f"optim.max_steps={args.steps}", "parallel.num_workers=1", *args.set])
        cfg.validate()
        (Path(tmp) / "run.json").write_text(json.dumps(to_dict(cfg)))
        parity, _ = openclip_side(["--parity"], Path(tmp) / "parity", "parity.json")
        theirs, theirs_wall = openclip_side(["--run-config", str(Path(tmp) / "run.json"), "--loader-workers",
                                             str(loader_workers(cfg))], Path(tmp) / "train", "train.json")
        started = time.perf_counter()
        result = fit(cfg)
        ours = {"wall_s": time.perf_counter() - started, "samples_per_second": steady_samples_per_second(result),
                "loss": history(result, "loss")}
    body = report(args, cfg, version, ours, theirs, theirs_wall, parity)
    print(body)
    write_section("vs-openclip", body, **({"doc": args.out} if args.out else {}))


def report(args: argparse.Namespace, cfg: RunConfig, version: DatasetVersion, ours: dict, theirs: dict,
           theirs_wall: float, parity: dict) -> str:
    flags = ([f"--dataset {args.dataset}"] if args.dataset else []) + \
        ([f"--steps {args.steps}"] if args.steps != DEFAULT_STEPS else []) + [f"--set {item}" for item in args.set]
    command = f"`.venv/bin/python bench/vs_openclip.py {' '.join(flags)}`" if flags else \
        "`make bench-openclip` (builds `.venv-openclip`, then runs `.venv/bin/python bench/vs_openclip.py`)"
    source = f"dataset version {version.id}" if args.dataset else "the sample corpus ingested through loopback HTTP"
    steps = [step for step, _ in ours["loss"]]
    theirs_windows = window_means(theirs["loss"], steps)
    ratio = ours["samples_per_second"] / theirs["samples_per_second"]
    lines = [
        "## Side by side with open_clip (demo recipe, one training process each, CPU)",
        "",
        f"Command: {command}",
        "",
        f"Dataset: {source} ({version.manifest['splits']}); model "
        f"`{cfg.model.name}`; global batch {cfg.data.batch_size}; {cfg.optim.max_steps} steps; fp32.",
        f"Ours: fit(), 1 Ray Train worker with {worker_threads(cfg.parallel, 1)} torch threads, DeepSpeed "
        f"ZeRO-{cfg.parallel.zero_stage}, Ray Data decoding "
        f"(up to {loader_workers(cfg)} tasks). open_clip {theirs['open_clip']} on torch {theirs['torch']}: "
        f"`CLIP` from a model config (text pooled at `<eos>`: `pool_type: eos`), `open_clip.loss.ClipLoss`, "
        f"torch AdamW with DeepSpeed's WarmupCosineLR reproduced (linear warm-up, cosine decay to 0.1 x lr), "
        f"grad clipping {cfg.optim.grad_clip}, a DataLoader "
        f"with {theirs['loader_workers']} workers, {theirs['torch_threads']} torch threads. open_clip's dataset "
        f"holds the train split's image bytes in memory (as its CsvDataset holds the file list) and decodes per "
        f"item; ours streams row groups from the Parquet shards.",
        "",
        "| measure | ours (fit) | open_clip |",
        "|---|---|---|",
        f"| training throughput (samples / time after the first {SKIPPED_STEPS} steps) | "
        f"{ours['samples_per_second']:.1f} samples/s | {theirs['samples_per_second']:.1f} samples/s |",
        f"| ours / open_clip (target >= 1.0) | {ratio:.2f} | |",
        f"| wall time: fit() (Ray start, workers, steps, checkpoints, validation, registration) / open_clip process "
        f"(imports, model, loader, steps) | {ours['wall_s']:.0f} s | {theirs_wall:.0f} s |",
        f"| open_clip's training loop alone | | {theirs['loop_wall_s']:.1f} s |",
        f"| parameters (model + logit scale) | {theirs['params']['ours']:,} | {theirs['params']['open_clip']:,} |",
        "",
        f"The parameter counts differ by {theirs['params']['ours'] - theirs['params']['open_clip']:,}: our "
        "patch-embedding convolution has a bias, open_clip's has none. Otherwise the architectures are the same "
        "computation (parity below). Each library initialises its own way, and the two runs see the rows in "
        "different orders, so the loss curves match in trend, not value.",
        "",
        "Train loss, mean over each of our logged windows (steps after the previous row, up to this one):",
        "",
        "| steps up to | ours | open_clip |",
        "|---|---|---|",
    ]
    lines += [f"| {step} | {loss:.3f} | {other:.3f} |" for (step, loss), other in zip(ours["loss"], theirs_windows)]
    lines += ["", f"Parity (one process, random unit-norm features, batch {parity['batch']}, dimension "
                  f"{parity['embed_dim']}; our initial scale, and SigLIP bias, given to both: ours holds "
                  f"log(scale), open_clip gets its exp):", "",
              "| loss | dtype | ours | open_clip | abs diff | max abs diff of gradients |", "|---|---|---|---|---|---|"]
    for name, by_dtype in parity["losses"].items():
        for dtype, row in by_dtype.items():
            grads = ", ".join(f"{k} {v:.1e}" for k, v in row["grad_max_abs_diff"].items())
            lines.append(f"| {name} | {dtype} | {row['ours']:.6f} | {row['open_clip']:.6f} | {row['abs_diff']:.1e} "
                         f"| {grads} |")
    model = parity["model"]
    lines += ["", "Model parity: clip-demo built by both libraries, our weights copied into open_clip's (our patch "
                  "bias zeroed), max abs difference of the unit-norm embeddings on random images and token rows: "
                  + "; ".join(f"{dtype} image {model[dtype]['image_features']:.1e}, text "
                              f"{model[dtype]['text_features']:.1e}" for dtype in ("float32", "float64")) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
