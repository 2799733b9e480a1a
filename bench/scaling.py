"""Scaling on paper: measured per-sample costs -> GPU-hours, bandwidth, storage and all-reduce of real runs.

Counts FLOPs per sample of clip-vit-b16 (`gpu-base`) and llava-base on the CPU, times a few JPEGs with PIL, and
takes the GPU and ingest rates recorded in docs/benchmarks.md as arguments. Nothing trains."""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import flops_per_sample, peak_tflops, write_section  # noqa: E402
from gpu import recipe_flops_per_sample  # noqa: E402
from gpu_engine import MODELS, prepared  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
CLIP_SAMPLES = 400e6 * 32  # OpenCLIP's LAION-400M recipe: 400M pairs x 32 epochs, 12.8B samples seen
ALIGN_PAIRS, INSTRUCT_CONVERSATIONS = 558e3, 665e3  # LLaVA-1.5's two phases, one epoch each
GPUS_PER_NODE = 8
H100, A100, MEASURED_ON = peak_tflops("H100"), peak_tflops("A100"), peak_tflops("H200")  # dense bf16 TFLOP/s


class Workload(NamedTuple):
    label: str
    samples: float  # seen in training
    pairs: float  # distinct, ingested once
    flop: float  # per training sample
    params: int  # trainable: the gradient the all-reduce carries
    mfu: float  # measured
    batch: int  # per GPU
    gather_dim: int = 0  # CLIP's loss gathers both towers' features of this width from every rank


def counted(captions: str, conversations: str) -> dict[str, tuple[float, int]]:
    """Workload -> (FLOPs per training sample, trainable parameters), on the CPU (attention counted:
    common.flops_by_op)."""
    import torch

    from mmcore.data.dataset import DatasetVersion
    from mmcore.models import model_config
    from mmcore.recipes import recipe
    from mmcore.tasks import build_task
    from mmcore.train.trainer import split_ids

    torch.set_num_threads(1)
    cfg, version = recipe("gpu-base", captions), DatasetVersion.open(captions)
    out = {}
    task, _ = build_task(cfg, model_config(cfg.model.name), version.tokenizer_path.read_text())
    out["clip"] = recipe_flops_per_sample(cfg, version), trainable(task)
    for name, dataset in (("align", captions), ("instruct", conversations)):
        _, _, _, task, _, batches = prepared("llava-base", MODELS["llava-base"][0], dataset, 2, 10, 2)
        task.model.lm.requires_grad_(name == "instruct")  # alignment: tower and LM frozen (model.freeze_lm)
        out[name] = flops_per_sample(task, split_ids(dict(batches[0]))[0]), trainable(task)
    return out


def trainable(task) -> int:
    return sum(p.numel() for p in task.parameters() if p.requires_grad)


def reencoded(raw: bytes, px: int) -> bytes:
    """An image decoded, resized to px x px and stored as the ingest stores it (JPEG, quality 95)."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert("RGB").resize((px, px), Image.BICUBIC).save(out, "JPEG", quality=95)
    return out.getvalue()


def decode_rates(stored: list[bytes], size: int, reps: int) -> list[float]:
    """Images/s on one core, per rep: decode a stored JPEG, crop 80% of it and resize that to `size`, to an array
    (what Ray Data's workers do to each image before the GPU normalises it)."""
    import numpy as np
    from PIL import Image

    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        for raw in stored:
            image = Image.open(io.BytesIO(raw)).convert("RGB")
            box = (0.1 * image.width, 0.1 * image.height, 0.9 * image.width, 0.9 * image.height)
            np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
        rates.append(len(stored) / (time.perf_counter() - start))
    return rates


def figure(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def duration(hours: float) -> str:
    return f"{hours:,.3g} h" if hours >= 1 else f"{60 * hours:.3g} min" if hours >= 1 / 60 else f"{3600 * hours:.2g} s"


def ring_ms(nbytes: float, n: int, args) -> float:
    """Ring all-reduce of `nbytes` (or an all-gather of them and its reduce-scatter back): 2 (n - 1) / n x bytes
    over the slowest link, NVLink inside one node and InfiniBand across nodes."""
    return 1e3 * 2 * (n - 1) / n * nbytes / ((args.nvlink_gbs if n <= GPUS_PER_NODE else args.ib_gbs) * 1e9)


def mfus(measured: float, args) -> list[tuple[str, float]]:
    """(label, MFU): the measured one, then the targets."""
    return [(f"{100 * measured:.1f}% (measured)", measured)] + [(f"{100 * m:.0f}% (target)", m) for m in args.targets]


def compute_table(works: list[Workload], image_bytes: float, args) -> list[str]:
    """Total FLOPs, H100-hours at the measured MFU and the targets, wall-clock on N GPUs at the measured MFU, and
    the pairs' storage at 224 px and ingest core-hours."""
    lines = ["| workload | samples | GFLOP/sample | total FLOP | H100-hours at measured MFU | "
             + " | ".join(f"at {100 * m:.0f}%" for m in args.targets) + " | "
             + " | ".join(f"on {n} GPUs" for n in args.gpus) + " | TB stored | ingest core-hours |",
             "|---|---|---|---|---|" + "---|" * (len(args.targets) + len(args.gpus) + 2)]
    for w in works:
        hours = [w.samples * w.flop / (m * H100 * 1e12) / 3600 for _, m in mfus(w.mfu, args)]
        lines.append(f"| {w.label} | {w.samples:,.0f} | {w.flop / 1e9:.1f} | {w.samples * w.flop:.2e} | "
                     f"{figure(hours[0])} ({100 * w.mfu:.1f}%) | " + " | ".join(map(figure, hours[1:])) + " | "
                     + " | ".join(duration(hours[0] / n) for n in args.gpus) + f" | {w.pairs * image_bytes / 1e12:.3g}"
                     f" | {figure(w.pairs / args.ingest_per_core / 3600)} |")
    return lines


def scaling_rows(w: Workload, io_bytes: float, decode_rate: float, args, targets: bool = True) -> list[str]:
    """One row per (GPUs, MFU): wall-clock, step time and communication, reads, CPU cores for decode and ingest."""
    rows = []
    for n in args.gpus:
        for label, m in mfus(w.mfu, args)[: None if targets else 1]:
            rate = m * H100 * 1e12 / w.flop  # samples/s per GPU
            step_ms, steps = 1e3 * w.batch / rate, w.samples / (w.batch * n)
            reduce16, reduce32 = ring_ms(w.params * 2, n, args), ring_ms(w.params * 4, n, args)
            gathered = ring_ms(n * w.batch * w.gather_dim * 2 * 2, n, args)  # both towers' bf16 features
            hours = steps * step_ms / 3.6e6
            rows.append(f"| {w.label} | {n} ({n // GPUS_PER_NODE}) | {label} | {steps:,.0f} | {duration(hours)} | "
                        f"{duration(steps * (step_ms + reduce16 + gathered) / 3.6e6)} | {step_ms:.0f} | "
                        f"{reduce16:.1f} ({reduce32:.1f}) | {gathered:.1f} | {n * rate * io_bytes / 1e9:.2f} "
                        f"({GPUS_PER_NODE * rate * io_bytes / 1e9:.2f}) | {rate / decode_rate:.1f} | "
                        f"{w.pairs / args.ingest_per_core / (3600 * hours):,.0f} |")
    return rows


def parse() -> argparse.Namespace:
    """The datasets, the rates recorded elsewhere (defaults: the values recorded, with their sources), assumptions."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", required=True, help="an ingested caption dataset (CLIP, alignment, stored bytes)")
    p.add_argument("--conversations", required=True, help="an ingested conversation dataset (instruction tuning)")
    p.add_argument("--clip-samples-per-s", type=float, default=1649,
                   help="clip-vit-b16, batch 256, one H200 (docs/benchmarks.md, gpu-engine section: 1649)")
    p.add_argument("--llava-samples-per-s", type=float, default=705,
                   help="llava-base, batch 64, one H200 (docs/benchmarks.md, gpu-engine section: 705)")
    p.add_argument("--ingest-per-core", type=float, default=248,
                   help="images/s per core of our whole ingest() (docs/benchmarks.md, ingest-throughput: 496 on 2)")
    p.add_argument("--openclip-a100-hours", type=float, default=10700,
                   help="OpenCLIP ViT-B/16 on LAION-400M, 32 epochs (open_clip docs/PRETRAINED.md: 10700 GPU-hours)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.45, 0.50], help="target MFUs (not measured)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256], help="GPU counts, 8 a node")
    p.add_argument("--nvlink-gbs", type=float, default=450, help="GB/s per GPU inside a node (NVLink, assumed)")
    p.add_argument("--ib-gbs", type=float, default=50, help="GB/s per GPU across nodes (a 400 Gb/s NIC a GPU)")
    p.add_argument("--out", type=Path, default=DOC, help="markdown file (default docs/scaling.md)")
    return p.parse_args()


def measure(args) -> dict:
    """Every figure measured here: FLOPs, stored bytes, JPEG sizes of the sample corpus's photos, per-core rates."""
    manifest = json.loads(Path(args.captions, "manifest.json").read_text())
    source, shards = manifest["source"]["path"], manifest["shards"]  # the shards' JPEGs are at the ingest size
    photos = [path.read_bytes() for path in sorted(Path(source).parent.glob("images/photos/*.jpg"))]
    if not photos:
        raise SystemExit(f"no photos beside the sample corpus the captions were ingested from ({source})")
    stored = [reencoded(raw, 224) for raw in photos]
    big = sum(map(len, stored))
    return {"flops": counted(args.captions, args.conversations), "decode": decode_rates(stored, 224, reps=5),
            "row64": sum(s["bytes"] for s in shards) / sum(s["rows"] for s in shards), "photos": len(photos),
            "bytes224": big / len(photos), "ratio": big / sum(len(reencoded(raw, 64)) for raw in photos)}


def workloads(args, got: dict) -> list[Workload]:
    from mmcore.models import model_config

    (clip, clip_p), (align, align_p), (inst, inst_p) = (got["flops"][k] for k in ("clip", "align", "instruct"))
    peak = MEASURED_ON * 1e12
    clip_mfu, llava_mfu = args.clip_samples_per_s * clip / peak, args.llava_samples_per_s * inst / peak
    clip_batch, batch, convs = MODELS["clip-vit-b16"][1], MODELS["llava-base"][1], INSTRUCT_CONVERSATIONS
    embed = model_config("clip-vit-b16")["embed_dim"]
    return [Workload("CLIP ViT-B/16 (400M x 32)", CLIP_SAMPLES, 400e6, clip, clip_p, clip_mfu, clip_batch, embed),
            Workload("LLaVA align (558K)", ALIGN_PAIRS, ALIGN_PAIRS, align, align_p, llava_mfu, batch),
            Workload("LLaVA instruct (665K)", convs, convs, inst, inst_p, llava_mfu, batch)]


def inputs_table(args, got: dict, works: list[Workload]) -> list[str]:
    clip, align, inst = works
    decode = ", ".join(f"{r:.0f}" for r in got["decode"])
    return ["| measured input | value | where from |", "|---|---|---|",
            f"| GFLOP per sample: CLIP (224 px) / llava-base instruction / alignment | {clip.flop / 1e9:.1f} / "
            f"{inst.flop / 1e9:.1f} / {align.flop / 1e9:.1f} | FlopCounterMode, here (CPU) |",
            f"| trainable parameters: CLIP / instruction / alignment | {clip.params / 1e6:.1f} M / "
            f"{inst.params / 1e6:.1f} M / {align.params / 1e6:.2f} M | the same Tasks |",
            f"| GPU samples/s: CLIP / llava-base -> MFU | {args.clip_samples_per_s:.0f} / "
            f"{args.llava_samples_per_s:.0f} -> {100 * clip.mfu:.1f}% / {100 * inst.mfu:.1f}% | docs/benchmarks.md "
            "gpu-engine (1 x H200, eager, one rank) |",
            f"| ingest() images/s per core | {args.ingest_per_core:.0f} | docs/benchmarks.md ingest-throughput |",
            f"| decode a 224-px JPEG, crop, resize to 224: images/s per core | {statistics.median(got['decode']):.0f} "
            f"(reps: {decode}) | here: PIL, the {got['photos']} photos of the sample corpus |",
            f"| bytes per image at 224 px: the photos (used below) / the demo's 64-px rows ({got['row64']:,.0f} B) x "
            f"the photos' 224/64 px ratio ({got['ratio']:.2f}) | {got['bytes224'] / 1e3:.1f} KB / "
            f"{got['row64'] * got['ratio'] / 1e3:.1f} KB | here: JPEG q95; the demo's manifest (shard bytes / rows) |"]


def body(args, got: dict, command: str) -> str:
    works = workloads(args, got)
    clip, decode, image = works[0], statistics.median(got["decode"]), got["bytes224"]
    a100_hours = clip.samples * clip.flop / (clip.mfu * A100 * 1e12) / 3600
    implied = clip.samples * clip.flop / (args.openclip_a100_hours * 3600 * A100 * 1e12)
    return "\n".join([
        "## Scaling on paper: ViT-B/16 CLIP and LLaVA from measured per-sample costs", "", f"Command: `{command}`", "",
        *inputs_table(args, got, works), "", "### Compute (H100), storage and ingest", "",
        *compute_table(works, image, args), "",
        f"OpenCLIP's ViT-B/16 on LAION-400M: {args.openclip_a100_hours:,.0f} A100-hours. Ours at the measured MFU on "
        f"A100s ({A100} TFLOP/s): {a100_hours:,.0f} A100-hours, ratio {a100_hours / args.openclip_a100_hours:.2f}; "
        f"OpenCLIP's hours imply {100 * implied:.1f}% MFU for our FLOP count.", "",
        "### On N GPUs (N/8 Ray nodes of 8)", "",
        "| workload | GPUs (nodes) | MFU | steps | wall-clock, compute | + communication | step ms | all-reduce ms "
        "bf16 (fp32) | feature gather ms | storage read GB/s (per node) | decode cores/GPU | ingest cores to fetch "
        "the pairs in that time |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *scaling_rows(clip, image, decode, args), *scaling_rows(works[2], image, decode, args, targets=False)])


def main() -> None:
    args = parse()
    got = measure(args)
    text = body(args, got, ".venv/bin/python " + " ".join(sys.argv))
    print(text)
    write_section("scaling", text, doc=args.out)


if __name__ == "__main__":
    main()
