"""Training against the hardware's limit: each stage's model FLOP/s over the machine's measured matmul FLOP/s.

In one run on one machine:
  - the limit: a 2048 x 2048 matmul at the training threads, fp32 and bf16 (the median of reps);
  - for each stage's model, the training workers' engine (start_engine + Trainer.fit as a worker runs them;
    no checkpoint, no validation) in one process on all the threads, with the recipe's global batch, on
    batches the stage's own preprocessing made from the sample corpus (prepared once and cycled, as
    bench/gpu_engine.py does: the data path is not what is timed), in each variant asked for: eager fp32,
    compiled (parallel.compile) and bf16 (parallel.precision), and on request fused (optim.fused: torch's fused
    AdamW; experiments/fused-adamw, not in the table);
  - FLOPs per sample: torch's FlopCounterMode over one forward + backward of the Task;
  - MFU: samples/s x FLOPs per sample / the fp32 matmul's FLOP/s (bf16's for the bf16 variant);
  - where the time goes: torch.profiler over 3 eager steps: the share of time in matmuls (mm, addmm, bmm),
    attention (SDPA), convolutions and the rest, and the FLOP/s inside the matmuls alone.
The demo models on a CPU; on a CUDA GPU pass --models with the base ones (the peak is then measured too).
Usage: python bench/mfu.py [--dataset DIR --instructions DIR] [--steps 40] [--models ...] [--variants ...]
(without datasets, the sample corpus is made, served on loopback and ingested, its URL list and its
conversation file, as the demo does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flops_by_op, write_section  # noqa: E402
from gpu_engine import Windows, cycled, prepared  # noqa: E402

MODELS = {  # model -> (recipe it trains with, whether it reads the instruction dataset)
    "clip-demo": ("demo", False), "lm-demo": ("demo-language", True), "llava-demo": ("demo-fusion", True),
    "flamingo-demo": ("demo-flamingo", True), "vq-demo": ("demo-tokenizer", False),
    "unified-demo": ("demo-unified", True),
    "clip-vit-b16": ("gpu-base", False), "llava-base": ("demo-fusion", True),
}
PARENTS = {"llava": "clip-demo", "flamingo": "clip-demo", "unified": "vq-demo"}
BASE_PARENTS = {"llava": "clip-vit-b16", "flamingo": "clip-vit-b16", "unified": "vq-demo"}
VARIANTS = {"eager": [], "compiled": ["parallel.compile=true"], "bf16": ["parallel.precision=bf16"],
            "fused": ["optim.fused=true"]}
DEFAULT_VARIANTS = ["eager", "compiled", "bf16"]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def sample_datasets(root: Path, image_size: int | None = None, spec=None) -> tuple[str, str]:
    """The sample corpus's URL list and conversation file ingested over loopback, as the demo does (`spec`: its
    SampleSpec, default the demo's; `image_size`: the side stored, default ingest's)."""
    from mmcore.data.config import DownloadConfig, GuardConfig, IngestConfig, SourceConfig
    from mmcore.data.ingest import ingest
    from mmcore.data.server import FileServer
    from mmcore.data.synthetic.corpus import make_sample

    guard = GuardConfig(allow_networks=["127.0.0.1/32"])
    download = DownloadConfig(image_size=image_size) if image_size else DownloadConfig()
    with FileServer(root / "corpus") as server:
        url_list = make_sample(root / "corpus", server.url, spec)
        captions = ingest(IngestConfig(source=SourceConfig(str(url_list)), out=str(root / "captions"), guard=guard,
                                       download=download))
        chats = ingest(IngestConfig(source=SourceConfig(str(url_list.parent / "conversations.jsonl"),
                                                        kind="instructions"),
                                    out=str(root / "instructions"), guard=guard, download=download))
    return str(captions.path), str(chats.path)


def sample_flops(task, batch: dict, device) -> tuple[float, float]:
    """FLOPs of one training sample of the Task (forward + backward, on the first two rows of a prepared batch):
    with attention, and of them in the linear layers' matmuls (under the kernels training runs)."""
    from mmcore.train.trainer import split_ids

    sample = {k: v[:2].to(device) for k, v in split_ids(dict(batch))[0].items()}
    per_sample = sum(flops_by_op(task.to(device), sample).values())  # attention included
    mm = sum(count for op, count in flops_by_op(task, sample, math_attention=False).items() if op in MATMULS)
    return per_sample, mm


def matmul_flops(dtype, device, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul at this process's threads (median of `reps` timed after 3 warm-ups)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(reps + 3):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_for(name: str, dataset: str, steps: int, variant: str, device, parents: dict):
    """(engine, dtype, ranks, config, prepared batches on the device, FLOPs per sample, matmul FLOPs per
    sample) of one model in one variant."""
    import dataclasses

    from mmcore.cli import apply_overrides
    from mmcore.recipes import recipe
    from mmcore.train.trainer import start_engine

    recipe_name = MODELS[name][0]
    batch = recipe(recipe_name, dataset).data.batch_size
    cfg, arch, tokenizer_json, task, _, batches = prepared(name, recipe_name, dataset, batch, steps, 2, parents)
    cfg = apply_overrides(cfg, ["parallel.precision=auto", *VARIANTS[variant]])  # auto: bf16 on a GPU
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, threads_per_worker=0))
    per_sample, mm = sample_flops(task, batches[0], device)
    del task  # start_engine builds its own
    engine, dtype, ranks = start_engine(cfg, arch, tokenizer_json, device, 1)
    return engine, dtype, ranks, cfg, [{k: v.to(device) for k, v in b.items()} for b in batches], per_sample, mm


def timed(engine, dtype, ranks, cfg, batches, steps: int) -> Windows:
    """The Trainer's own loop over the batches for `steps` more optimizer steps; its logged windows."""
    import dataclasses

    from mmcore.train.trainer import Trainer

    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=engine.global_steps + steps),
                              checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=10**9))  # none
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(engine, cfg, dtype, Path(run_dir), ranks)
        trainer.logger = windows = Windows()
        trainer.fit(cycled(batches), [])
    return windows


def profiled(engine, dtype, ranks, cfg, batches, device) -> dict:
    """Seconds in each kind of op over 3 more training steps of the Trainer, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        timed(engine, dtype, ranks, cfg, batches[:3], 3)
        synchronize(device)
    kinds = {"matmul": 0.0, "attention": 0.0, "convolution": 0.0, "other": 0.0}
    for event in prof.key_averages():  # CPU: ops by their own time; GPU: kernels, by their names
        seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        kinds[_kind(event.key.lower(), cuda)] += seconds
    return kinds


def _kind(name: str, cuda: bool) -> str:
    if (name in MATMULS) if not cuda else any(k in name for k in ("gemm", "cutlass", "xmma", "cublas")):
        return "matmul"
    if any(k in name for k in ("scaled_dot_product", "flash", "fmha", "attention")):
        return "attention"
    return "convolution" if "conv" in name else "other"


def measure(name: str, dataset: str, variant: str, args, device, parents: dict) -> dict:
    import torch

    engine, dtype, ranks, cfg, batches, per_sample, mm = engine_for(name, dataset, args.steps, variant, device,
                                                                    parents)
    windows = timed(engine, dtype, ranks, cfg, batches, args.steps)
    rate, first_s = windows.rate(args.warmup), 10 * cfg.data.batch_size / windows.points[0][1]["samples_per_second"]
    result = {"model": name, "variant": variant, "recipe": cfg.recipe, "batch": cfg.data.batch_size,
              "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
              "threads": torch.get_num_threads(), "samples_per_second": rate, "first_window_s": first_s,
              "gflop_per_sample": per_sample / 1e9, "matmul_share_of_flops": mm / per_sample,
              "flops": rate * per_sample,
              "loss": windows.points[-1][1]["loss"]}
    if variant == "eager":
        kinds = profiled(engine, dtype, ranks, cfg, batches, device)
        total = sum(kinds.values())
        result.update({f"{k}_share": v / total for k, v in kinds.items()},
                      matmul_flops=3 * len(batches[0]["sample"]) * mm / kinds["matmul"] if kinds["matmul"] else 0)
    del engine
    print(result, flush=True)
    return result


def table(results: list[dict], peaks: dict, args, device_name: str, threads: int) -> str:
    by = {(r["model"], r["variant"]): r for r in results}
    lines = [
        "## Training against the hardware's limit (MFU)", "",
        f"Command: `{command(args)}`", "",
        f"{device_name}, {threads} threads in one process. The limit, measured in this run: a 2048 x 2048 matmul "
        f"at {peaks['fp32'] / 1e9:.0f} GFLOP/s in fp32 and {peaks['bf16'] / 1e9:.0f} in bf16. Each model trains "
        f"in the workers' engine (DeepSpeed ZeRO-2, the Trainer's loop) on its recipe's global batch, {args.steps}"
        f" steps, samples/s after {args.warmup}; MFU = samples/s x FLOPs per sample (forward + backward, counted "
        "by torch) / the matmul's FLOP/s in the same precision. Where the time goes: torch.profiler over 3 "
        "eager steps; the matmuls' own FLOP/s is their FLOPs over their time.", "",
        "| model (recipe) | batch | GFLOP/sample (in matmuls) | eager samples/s | eager MFU | time in matmuls / "
        "attention / conv / rest | FLOP/s inside the matmuls | compiled / eager (first 10 steps s) | bf16 / eager"
        " (bf16 MFU) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        eager = by.get((name, "eager"))
        if not eager:
            continue
        compiled, bf16 = by.get((name, "compiled")), by.get((name, "bf16"))
        shares = " / ".join(f"{100 * eager[f'{k}_share']:.0f}%" for k in ("matmul", "attention", "convolution",
                                                                            "other"))
        inside = eager["matmul_flops"] / peaks[eager["precision"]]
        lines.append(
            f"| `{name}` (`{eager['recipe']}`) | {eager['batch']} | {eager['gflop_per_sample']:.2f} "
            f"({100 * eager['matmul_share_of_flops']:.0f}%) | {eager['samples_per_second']:.0f} | "
            f"{100 * eager['flops'] / peaks[eager['precision']]:.0f}% | {shares} | "
            + (f"{eager['matmul_flops'] / 1e9:.0f} GFLOP/s ({100 * inside:.0f}% of the limit)" if inside else "-")
            + " | "
            + (f"{compiled['samples_per_second'] / eager['samples_per_second']:.2f} ({compiled['first_window_s']:.0f}"
               f" s vs {eager['first_window_s']:.0f} s)" if compiled else "-") + " | "
            + (f"{bf16['samples_per_second'] / eager['samples_per_second']:.2f} "
               f"({100 * bf16['flops'] / peaks['bf16']:.0f}%)" if bf16 and eager["precision"] == "fp32"
               else "-") + " |")
    return "\n".join(lines)


def command(args) -> str:
    line = f".venv/bin/python bench/mfu.py --steps {args.steps} --warmup {args.warmup}"
    line += " --dataset CAPTIONS --instructions CONVERSATIONS" if args.given else ""
    line += "" if args.models == list(MODELS)[:6] else " --models " + " ".join(args.models)
    return line + ("" if args.variants == DEFAULT_VARIANTS else " --variants " + " ".join(args.variants))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a caption dataset version (default: the sample corpus's URL list)")
    parser.add_argument("--instructions", help="an instruction dataset (default: the corpus's conversations)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS)[:6])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of samples/s (10-step windows)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    import torch

    from mmcore.train.here import join_process_group

    from mmcore.config import ParallelConfig
    from mmcore.train.parallel import worker_threads

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    join_process_group(device)
    torch.set_num_threads(worker_threads(ParallelConfig(num_workers=1), 1))  # as start_engine sets them
    peaks = {"fp32": matmul_flops(torch.float32, device), "bf16": matmul_flops(torch.bfloat16, device)}
    parents = BASE_PARENTS if device.type == "cuda" else PARENTS
    scratch = tempfile.TemporaryDirectory()
    args.given = bool(args.dataset and args.instructions)
    if not args.given:
        args.dataset, args.instructions = sample_datasets(Path(scratch.name))
    results = []
    for name in args.models:
        dataset = args.instructions if MODELS[name][1] else args.dataset
        # eager last: the profiler it runs slowed a compiled engine made after it in the same process 5x
        for variant in [*[v for v in args.variants if v != "eager"], "eager"]:
            torch.manual_seed(0)
            try:
                results.append(measure(name, dataset, variant, args, device, parents))
            except Exception as err:  # the other models still run; the printout names what failed
                print(f"{name} {variant}: {type(err).__name__}: {err}", flush=True)
    threads = torch.get_num_threads()
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):  # the better of before and after
        peaks[key] = max(peaks[key], matmul_flops(dtype, device))
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    body = table(results, peaks, args, device_name, threads)
    print(body)
    write_section("mfu", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
