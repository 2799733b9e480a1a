"""Every stage's model on a CUDA GPU through the training workers' engine: DeepSpeed ZeRO-2, bf16, NCCL.

fit() runs this engine inside Ray Train workers (bench/gpu.py times that, end to end). This bench needs
only torch, DeepSpeed and mmcore, so it also runs where the rest of the stack is not installed: one
process, a world of one on NCCL, and for each model the trainer a training worker runs
(mmcore/train/trainer.py): start_engine (the Task from build_task, with fresh weights: no registry here,
so the parents' parts are fresh too; the precision resolve_precision picks on this GPU, "auto" -> bf16;
DeepSpeed from build_ds_config and param_groups) and Trainer.fit, with no checkpoint and no validation.
Batches are made by the stage's own preprocessing from an ingested dataset version's train shards
(upscaled to the model's image size where it is larger than the stored 64 pixels); a few are prepared
once and cycled, so the CPU's preprocessing is not what is timed.
Per model: parameters, the mean loss of the first and last 10 steps, steady samples/s (the Trainer's
10-step windows after --warmup steps), FLOPs per sample (torch's FlopCounterMode over one forward +
backward of the Task, before training), MFU against the GPU's dense bf16 peak, and peak GPU memory.
Usage: python bench/gpu_engine.py --dataset DIR [--steps 150] [--models clip-vit-b16 llava-base ...]
Refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flops_per_sample, nccl_world_of_one, peak_tflops, write_section  # noqa: E402

MODELS = {  # model -> (recipe whose optimizer and task it trains with, micro-batch on one GPU)
    "clip-vit-b16": ("gpu-base", 256),
    "llava-base": ("demo-fusion", 64),
    "flamingo-base": ("demo-flamingo", 64),
    "vq-demo": ("demo-tokenizer", 256),
    "unified-demo": ("demo-unified", 256),
}
PARENTS = {"llava": "clip-vit-b16", "flamingo": "clip-vit-b16", "unified": "vq-demo"}
"""A fusion model takes its tower's architecture from a ViT-B/16, the unified one its image tokenizer's
from vq-demo (fit takes them from the registered parent: mmcore/stages.py)."""


class Windows:
    """The Trainer's metric logger here (trainer.MetricLogger): keeps the windows it logs every 10 steps."""

    failures = 0

    def __init__(self):
        self.points: list[tuple[int, dict]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "samples_per_second" in metrics:  # a window, not a validation point
            self.points.append((step, metrics))

    def rate(self, warmup: int) -> float:
        """samples/s over the windows that start after `warmup` steps (their samples over their seconds)."""
        ends = [step for step, _ in self.points]
        timed = [(end - start, m["samples_per_second"]) for start, end, (_, m) in zip([0, *ends], ends, self.points)
                 if start >= warmup]  # (steps in the window, its samples/s)
        return sum(n for n, _ in timed) / sum(n / r for n, r in timed)

    def unsent(self) -> list[list]:
        return []

    def close(self, wait_s: float) -> int:
        return 0


def cycled(batches: list[dict]):
    """The Trainer's batches: (a fresh dict, 0 s waited) without end (it pops each batch's row ids)."""
    for batch in itertools.cycle(batches):
        yield dict(batch), 0.0


def packed_to_context(cfg, arch: dict):
    """`cfg` with a packed row at least the model's text context long (the demo recipes pack to a demo LM's), so a
    row holds at least one question of a larger model."""
    import dataclasses

    context = arch.get("lm", {}).get("context_length", 0)
    if cfg.data.pack_length and cfg.data.pack_length < context:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pack_length=context))
    return cfg


def prepared(name: str, recipe_name: str, dataset: str, batch: int, steps: int, zero: int,
             parents: dict[str, str] = PARENTS):
    """(RunConfig, architecture, tokenizer JSON, a Task, its preprocessor, a few prepared batches as tensors
    with each row's `epoch` and `sample`) for model `name` trained as recipe `recipe_name` does, its parent's
    architecture from `parents` (family -> model). The Task is built as start_engine builds it (same seed), so
    the unified stage's batches are coded by the image tokenizer the engine's model holds."""
    import dataclasses

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from mmcore.data.dataset import DatasetVersion
    from mmcore.models import architecture, model_config
    from mmcore.recipes import recipe
    from mmcore.stages import STAGES
    from mmcore.tasks import build_task

    cfg = recipe(recipe_name, dataset)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name=name, parent=""),
        data=dataclasses.replace(cfg.data, batch_size=batch),
        optim=dataclasses.replace(cfg.optim, max_steps=steps, warmup_steps=min(cfg.optim.warmup_steps, steps // 10)),
        parallel=dataclasses.replace(cfg.parallel, num_workers=1, precision="auto", zero_stage=zero),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=steps + 1))  # none written
    arch = model_config(name)
    if arch["family"] in parents:
        part = STAGES[cfg.task.stage].parent.takes
        arch = {**arch, **part(model_config(parents[arch["family"]]))}
    cfg = packed_to_context(cfg, arch)
    version = DatasetVersion.open(dataset)
    tokenizer_json = STAGES[cfg.task.stage].task.tokenizer(version.tokenizer_path.read_text(), arch)
    torch.manual_seed(cfg.seed)  # as start_engine seeds rank 0
    task, preprocess = build_task(cfg, arch, tokenizer_json)
    if cfg.task.stage == "unified":  # its data workers encode images with the parent tokenizer's weights
        from mmcore.data.mixed import MixedPreprocessor

        state = {k: v.numpy() for k, v in task.model.image_tokenizer.state_dict().items()}
        pre = MixedPreprocessor(preprocess, tokenizer_json, {"config": architecture(arch["image_tokenizer"]),
                                                             "state": state},
                                seed=cfg.seed, pack_length=cfg.data.pack_length)
    else:
        pre = STAGES[cfg.task.stage].task.preprocessor(cfg, preprocess, tokenizer_json)
    shard = sorted(Path(dataset, "shards").glob("train-*.parquet"))[0]
    table = pq.read_table(shard)
    columns = [c for c in pre.columns if c in table.column_names]
    batches = []
    for start in range(0, min(len(table), 4 * batch) - batch + 1, batch):
        rows = {c: table[c].slice(start, batch).to_numpy(zero_copy_only=False) for c in columns}
        rows["epoch"] = np.zeros(batch, np.int64)
        made = {k: torch.as_tensor(np.asarray(v)) for k, v in pre(rows).items()}
        made.update(epoch=torch.zeros(batch, dtype=torch.int64), sample=torch.arange(start, start + batch))
        batches.append(made)
    return cfg, arch, tokenizer_json, task, pre, batches


def generation(task, pre, batch: dict) -> str:
    """The trained model's inference on this GPU: a fusion model answers 8 of the batch's images with and
    without the KV cache (greedy; are the tokens the same?); the unified model draws 8 images from a
    caption (codes in range, pixels of the configured size)."""
    import torch

    from mmcore.data.instruct import ChatFormat
    from mmcore.data.tokenizer import BOS

    model = task.model.eval()
    if task.stage == "fusion":
        chat = ChatFormat.of(pre)
        images = task.pixels(batch["image"][:8], model.lm.head.weight.dtype)
        prompt = torch.tensor([chat.prompt("what colour is the circle?")] * 8, device=images.device)
        cached = model.generate(images, prompt, max_new_tokens=8)
        uncached = model.generate(images, prompt, max_new_tokens=8, use_cache=False)
        same = cached.shape == uncached.shape and bool((cached == uncached).all())
        answer = chat.tokenizer.decode(cached[0].tolist(), skip_special_tokens=True).strip()
        return f"cached = uncached: {'yes' if same else 'no'} (8 answers; first: {answer!r})"
    if task.stage == "unified":
        chat = ChatFormat.of(pre)
        caption = chat.tokenizer.encode("a red circle", add_special_tokens=False).ids
        prompt = torch.tensor([[chat.ids[BOS], *caption]] * 8, device=next(model.parameters()).device)
        codes = model.generate_image_codes(prompt, guidance=3.0)
        pixels = model.image_tokenizer.decode(codes)
        in_range = bool(((codes >= 0) & (codes < model.image_tokenizer.codebook_size)).all())
        return f"8 drawings: codes in range: {'yes' if in_range else 'no'}, pixels {tuple(pixels.shape[1:])}"
    return ""


def train(name: str, dataset: str, steps: int, warmup: int, batch_size: int | None, zero: int) -> dict:
    import torch

    from mmcore.train.deepspeed_config import cast_floating
    from mmcore.train.trainer import Trainer, split_ids, start_engine

    batch = batch_size or MODELS[name][1]
    cfg, arch, tokenizer_json, task, pre, batches = prepared(name, MODELS[name][0], dataset, batch, steps, zero)
    per_sample = flops_per_sample(task.cuda(), {k: v[:2].cuda() for k, v in split_ids(dict(batches[0]))[0].items()})
    parameters = sum(p.numel() for p in task.parameters())
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    del task  # start_engine builds its own
    torch.cuda.empty_cache()
    engine, dtype, ranks = start_engine(cfg, arch, tokenizer_json, torch.device("cuda"), 1)
    on_device = [{k: v.cuda() for k, v in b.items()} for b in batches]
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(engine, cfg, dtype, Path(run_dir), ranks)
        trainer.logger = windows = Windows()
        trainer.fit(cycled(on_device), [])
    points = windows.points
    rate = windows.rate(warmup)
    peak = peak_tflops(torch.cuda.get_device_name(0))
    result = {"model": name, "stage": cfg.task.stage, "recipe": cfg.recipe, "batch": batch, "steps": steps,
              "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
              "param_dtype": str(next(engine.module.parameters()).dtype),
              "parameters": parameters, "trainable": trainable,
              "first_loss": points[0][1]["loss"], "last_loss": points[-1][1]["loss"],
              "samples_per_second": rate, "gflop_per_sample": per_sample / 1e9,
              "mfu": rate * per_sample / (peak * 1e12) if peak else None,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    shown = cast_floating(split_ids(dict(on_device[0]))[0], dtype)
    result["inference"] = generation(engine.module, pre, shown) if zero < 3 else "- (ZeRO-3 shards the weights)"
    print(json.dumps(result), flush=True)
    del engine, on_device
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="an ingested dataset version (e.g. the sample corpus's)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=30,
                        help="steps left out of samples/s (rounded up to the Trainer's 10-step windows)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch for every model (default: MODELS')")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    if -(-args.warmup // 10) * 10 + 10 > args.steps:
        parser.error("--steps must leave at least one 10-step window after --warmup")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_engine.py needs a CUDA GPU and a CUDA build of torch; none found here")
    nccl_world_of_one(29511)
    import deepspeed

    results = []
    for name in args.models:
        torch.manual_seed(0)
        try:
            results.append(train(name, args.dataset, args.steps, args.warmup, args.batch, args.zero))
        except Exception as err:  # the other models still run; the table names what failed
            print(f"{name}: {type(err).__name__}: {err}", flush=True)
            results.append({"model": name, "error": f"{type(err).__name__}: {err}"[:200]})
    import torch.distributed as dist

    backend = dist.get_backend()
    gpu = torch.cuda.get_device_name(0)
    command = f".venv/bin/python bench/gpu_engine.py --dataset DIR --steps {args.steps} --warmup {args.warmup}"
    command += "" if args.models == list(MODELS) else " --models " + " ".join(args.models)
    command += f" --batch {args.batch}" if args.batch else ""
    command += f" --zero {args.zero}" if args.zero != 2 else ""
    lines = ["## GPU path: every stage's model through the workers' engine" + (f" (ZeRO-{args.zero})" if args.zero != 2 else ""), "", f"Command: `{command}`", "",
             f"1 x {gpu}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, process group backend "
             f"`{backend}`, ZeRO-{args.zero}, `start_engine` + `Trainer.fit` (no checkpoint); the sample corpus's "
             "train shard through each stage's own preprocessing "
             f"(64-pixel images upscaled to the model's size), 4 batches prepared once and cycled; samples/s "
             f"after {args.warmup} steps; MFU against {peak_tflops(gpu) or '?'} TFLOP/s dense bf16. Fusion and "
             "unified models with fresh parents (no registry here).", "",
             "| model | stage (recipe) | batch | precision (params) | parameters (trainable) | loss, first 10 -> "
             "last 10 steps | samples/s | GFLOP/sample | MFU | peak memory | inference after training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| `{r['model']}` | failed: {r['error']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| `{r['model']}` | {r['stage']} (`{r['recipe']}`) | {r['batch']} | {r['precision']} "
                     f"({r['param_dtype'].removeprefix('torch.')}) | {r['parameters'] / 1e6:.1f} M "
                     f"({r['trainable'] / 1e6:.1f} M) | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{r['samples_per_second']:.0f} | {r['gflop_per_sample']:.2f} | {mfu} | "
                     f"{r['peak_memory_gib']:.1f} GiB | {r['inference'] or '-'} |")
    body = "\n".join(lines)
    print(body)
    write_section("gpu-engine" + (f"-zero{args.zero}" if args.zero != 2 else ""), body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
