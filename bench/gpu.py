"""The GPU path: clip-vit-b16 in bf16 through the same fit(), samples/s and MFU, in under 5 minutes.

On a machine with CUDA GPUs (and a CUDA build of torch in the venv): ingest the sample corpus through
loopback HTTP, train the `gpu-base` recipe (ViT-B/16 at 224 px, bf16, DeepSpeed ZeRO-2, NCCL, one Ray
Train worker per GPU) for --steps steps, and report
  - samples/s: the logged windows after the first (which holds start-up), as bench/train_contrastive.py;
  - MFU: achieved FLOP/s / the GPUs' peak dense bf16 FLOP/s. FLOPs per sample are counted, not
    estimated: torch's FlopCounterMode over one forward + backward of the Task on one sample (matmuls
    and attention of both towers, the patch embedding and the loss).
Usage: python bench/gpu.py [--steps 300] [--batch 256] [--peak-tflops 989]
Refuses to run without CUDA: the CPU figures are bench/train_contrastive.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flops_per_sample, peak_tflops, write_section  # noqa: E402
from train_contrastive import sample_dataset, steady_samples_per_second  # noqa: E402

from mmcore.cli import apply_overrides  # noqa: E402
from mmcore.recipes import recipe  # noqa: E402

def recipe_flops_per_sample(cfg, version) -> float:
    """FLOPs of one training sample (forward + backward) of the recipe's Task, on 2 random samples."""
    import torch

    from mmcore.models import model_config
    from mmcore.tasks import build_task

    task, pre = build_task(cfg, model_config(cfg.model.name), version.tokenizer_path.read_text())
    batch = {"image": torch.randint(0, 256, (2, 3, pre.image_size, pre.image_size), dtype=torch.uint8),
             "tokens": torch.randint(5, 100, (2, pre.context_length))}
    return flops_per_sample(task, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256, help="per GPU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s of one GPU (default: looked up by the GPU's name)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs CUDA GPUs and a CUDA build of torch; none found here")
    gpus, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(name)
    if peak is None:
        raise SystemExit(f"no peak bf16 TFLOP/s known for {name!r}: pass --peak-tflops")
    from mmcore.train.fit import fit

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMPIPE_HOME"] = str(Path(tmp) / "home")
        version = sample_dataset(Path(tmp), image_size=224)  # a model may not take larger images than stored
        cfg = apply_overrides(recipe("gpu-base", str(version.path)), [
            f"optim.max_steps={args.steps}", f"optim.warmup_steps={args.steps // 10}",
            f"data.batch_size={args.batch * gpus}", f"parallel.num_workers={gpus}",
            f"checkpoint.every_steps={args.steps}", "data.val_batches=2"])
        started = time.perf_counter()
        result = fit(cfg)
        wall = time.perf_counter() - started
        rate = steady_samples_per_second(result)
        per_sample = recipe_flops_per_sample(cfg, version)
    mfu = rate * per_sample / (gpus * peak * 1e12)
    body = "\n".join([
        "## GPU path (clip-vit-b16, bf16)", "",
        f"Command: `.venv/bin/python bench/gpu.py --steps {args.steps} --batch {args.batch}`", "",
        f"{gpus} x {name}, recipe `gpu-base` ({cfg.parallel.num_workers} Ray Train workers, DeepSpeed "
        f"ZeRO-{cfg.parallel.zero_stage}, bf16, NCCL), global batch {cfg.data.batch_size}, {args.steps} steps, "
        "the sample corpus ingested at 224 px.", "",
        "| measure | value |", "|---|---|",
        f"| fit() wall time (Ray start, workers, steps, validation, registration) | {wall:.0f} s |",
        f"| training throughput (logged windows after the first) | {rate:.0f} samples/s |",
        f"| FLOPs per training sample (forward + backward, counted by torch) | {per_sample / 1e9:.1f} GFLOP |",
        f"| MFU (achieved / {gpus} x {peak:.0f} TFLOP/s peak dense bf16) | {100 * mfu:.1f}% |",
        f"| final train loss | {result.metrics['loss']:.3f} |",
    ])
    print(body)
    write_section("gpu", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
