"""The whole stack on a GPU: ViT-B/16 CLIP, then LLaVA-base on it, in bf16 through fit(): samples/s and MFU.

On a machine with CUDA GPUs (and a CUDA build of torch), each model trains through the same fit() as on a CPU:
Ray Train (one worker per GPU, DeepSpeed ZeRO-2 on NCCL), Ray Data feeding it from the dataset's Parquet shards,
checkpoints, MLflow registration on a sqlite file. clip-vit-b16 trains with the `gpu-base` recipe on the caption
dataset; llava-base with `demo-fusion`'s optimizer and packing on the conversations, its parent the CLIP just
registered (the tower frozen and run on the pixels every step, `data.derived=false`, as bench/gpu_engine.py
measures the engine alone). Per model:
  - samples/s: the logged windows after the first (which holds start-up), as bench/train_contrastive.py;
  - MFU: samples/s x FLOPs per sample (forward + backward, counted by torch's FlopCounterMode with attention's
    math kernel: bench/mfu.py's count) / the GPUs' peak dense bf16 FLOP/s.
Datasets: --dataset and --instructions (stored at 224 px or more), else a small sample corpus (1,000 scenes,
300 digits) is made, served on loopback and ingested at 224 px; `--make-datasets DIR` does only that (the GPU
kit of bench/gpu_checks.sh carries them, since img2dataset is not installed there).
Usage: python bench/gpu.py [--models clip-vit-b16 llava-base] [--steps 200] [--dataset D --instructions I]
Refuses to train without CUDA (the CPU figures are bench/mfu.py's), but for `--smoke`: the same runs on the CPU
with the debug models for a few steps, which checks the script before a GPU machine's minutes are spent on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_tflops, write_section  # noqa: E402
from gpu_engine import MODELS, packed_to_context, prepared  # noqa: E402
from mfu import BASE_PARENTS, sample_datasets, sample_flops  # noqa: E402
from train_contrastive import steady_samples_per_second  # noqa: E402

from mmcore.cli import apply_overrides  # noqa: E402
from mmcore.recipes import recipe  # noqa: E402

IMAGE_SIZE = 224
SMOKE = {"clip-vit-b16": "clip-debug", "llava-base": "llava-debug"}
"""--smoke: the model each one's run trains instead, on the CPU."""
SAMPLE = {"synthetic": 1000, "digits": 300, "image_px": IMAGE_SIZE}
"""The small sample corpus the GPU runs train on (SampleSpec fields): throughput, not what a model learns."""


def small_datasets(root: Path) -> tuple[str, str]:
    from mmcore.data.synthetic.corpus import SampleSpec

    return sample_datasets(root, IMAGE_SIZE, SampleSpec(**SAMPLE))


def config(name: str, dataset: str, steps: int, gpus: int, parent: str, smoke: bool = False):
    """The RunConfig of model `name` through fit(): its recipe (MODELS), the per-GPU batch, one worker per GPU,
    ZeRO-2, bf16 (the recipes' `auto` on a GPU that has it), a checkpoint at the end, two validation batches;
    `smoke`: the debug model instead, 8 rows a step, on the CPU."""
    from mmcore.models import model_config

    recipe_name, batch = MODELS[name]
    cfg = recipe(recipe_name, dataset)
    model = SMOKE[name] if smoke else name
    overrides = [f"model.name={model}", f"optim.max_steps={steps}", f"optim.warmup_steps={steps // 10}",
                 f"data.batch_size={8 if smoke else batch * gpus}", f"parallel.num_workers={gpus}",
                 f"parallel.use_gpu={str(not smoke).lower()}",
                 "parallel.zero_stage=2", "parallel.precision=auto", f"checkpoint.every_steps={steps}",
                 "data.val_batches=2", f"tracking.model_name=gpu-{name}"]
    if parent:  # the fusion model: its tower the registered CLIP's, run on pixels
        overrides += [f"model.parent={parent}", "data.derived=false"]
    return packed_to_context(apply_overrides(cfg, overrides), model_config(model))


def measured(name: str, dataset: str, args, gpus: int, peak: float, parent: str = "") -> dict:
    """fit() of one model; its wall time, steady samples/s, FLOPs per sample and MFU."""
    import torch

    from mmcore.train.fit import fit

    cfg = config(name, dataset, args.steps, gpus, parent, args.smoke)
    started = time.perf_counter()
    result = fit(cfg)
    wall = time.perf_counter() - started
    rate = steady_samples_per_second(result)
    parents = {"llava": SMOKE["clip-vit-b16"]} if args.smoke else BASE_PARENTS
    *_, task, _, batches = prepared(cfg.model.name, cfg.recipe, dataset, 2, 10, 2, parents)
    per_sample, _ = sample_flops(task, batches[0], torch.device("cpu" if args.smoke else "cuda"))
    return {"name": name, "cfg": cfg, "uri": result.model_uri, "wall": wall, "rate": rate, "flops": per_sample,
            "mfu": rate * per_sample / (gpus * peak * 1e12), "loss": result.metrics["loss"]}


def table(results: list[dict], args, gpus: int, name: str, peak: float) -> str:
    lines = ["## GPU path through fit() (clip-vit-b16, llava-base; bf16)" + (" [smoke]" if args.smoke else ""), "",
             f"Command: `.venv/bin/python bench/gpu.py --steps {args.steps}"
             + (" --dataset CAPTIONS --instructions CONVERSATIONS`" if args.dataset else "`"), "",
             f"{gpus} x {name}: fit() as on a CPU (Ray Train, {gpus} worker(s), DeepSpeed ZeRO-2, bf16, NCCL, Ray "
             f"Data, checkpoint, MLflow registration), {args.steps} steps per model, the sample corpus at "
             f"{IMAGE_SIZE} px. MFU = samples/s x FLOPs per sample (forward + backward, counted by torch) / "
             f"{gpus} x {peak:.0f} TFLOP/s peak dense bf16.", "",
             "| model (recipe) | global batch | fit() wall (start, steps, validation, registration) | samples/s "
             "(after the first window) | GFLOP/sample | MFU | final loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        cfg = r["cfg"]
        lines.append(f"| `{cfg.model.name}` (`{cfg.recipe}`) | {cfg.data.batch_size} | {r['wall']:.0f} s | "
                     f"{r['rate']:.0f} | {r['flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | {r['loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["clip-vit-b16", "llava-base"],
                        default=["clip-vit-b16", "llava-base"], help="llava-base trains on clip-vit-b16's tower")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dataset", help="a caption dataset version stored at 224 px or more")
    parser.add_argument("--instructions", help="an instruction dataset version stored at 224 px or more")
    parser.add_argument("--make-datasets", type=Path, metavar="DIR",
                        help="only ingest the small sample corpus at 224 px into DIR/captions, DIR/instructions")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s of one GPU (default: looked up by the GPU's name)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    parser.add_argument("--smoke", action="store_true", help="the debug models on the CPU, to check the script")
    args = parser.parse_args()
    if args.make_datasets:
        print("\n".join(small_datasets(args.make_datasets)))
        return
    import torch

    if args.smoke:
        gpus, name = 1, "CPU (smoke)"
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs CUDA GPUs and a CUDA build of torch; none found here")
    else:
        gpus, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(name)
    if peak is None:
        raise SystemExit(f"no peak bf16 TFLOP/s known for {name!r}: pass --peak-tflops")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMPIPE_HOME"] = str(Path(tmp) / "home")
        captions, chats = (args.dataset, args.instructions) if args.dataset else small_datasets(Path(tmp))
        results = []
        if "clip-vit-b16" in args.models:
            results.append(measured("clip-vit-b16", captions, args, gpus, peak))
            print(results[-1], flush=True)
        if "llava-base" in args.models:
            if not results:
                raise SystemExit("llava-base trains on the CLIP this run registers: add clip-vit-b16 to --models")
            results.append(measured("llava-base", chats, args, gpus, peak, parent=results[0]["uri"]))
    body = table(results, args, gpus, name, peak)
    print(body)
    if args.out or not args.smoke:  # a smoke run's figures are not the GPU's
        write_section("gpu", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
