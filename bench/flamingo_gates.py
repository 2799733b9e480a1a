"""Flamingo's tanh gates: does the image get in? The demo Flamingo trained with each gate_scale.

The same `flamingo-demo` model on a home's contrastive parent, trained in one process with plain
AdamW on the fusion task's batches (the demo-flamingo recipe's lr, schedule and clipping; the same
fixed batches for every scale; no Ray, so three scales fit in minutes), then: validation loss, the
same with every gate set to zero (the LM alone, without the image), and how far the gates opened.
A gate that stays near zero leaves a Flamingo that answers from the question alone.
Usage:
  python bench/flamingo_gates.py --home HOME --dataset DIR [--parent models:/mmpipe-contrastive@champion]
         [--scales 1 10 30] [--steps 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402

TRAIN_BATCHES, VAL_BATCHES, BATCH = 60, 6, 64


def trial(cfg, arch: dict, version, uri: str, scale: float, steps: int) -> dict:
    """Train flamingo-demo with this gate_scale for `steps` steps; validation loss with and without the gates."""
    import torch

    from mmcore.data.stream import fixed_batches, work_units
    from mmcore.tasks import TASKS, build_task
    from mmcore.train.parallel import param_groups

    torch.manual_seed(cfg.seed)
    tokenizer_json = TASKS["fusion"].tokenizer(version.tokenizer_path.read_text())
    task, preprocess = build_task(cfg, {**arch, "gate_scale": scale}, tokenizer_json, uri)
    pre = TASKS["fusion"].preprocessor(cfg, preprocess, tokenizer_json)
    train = fixed_batches(work_units(version, "train"), pre, BATCH, TRAIN_BATCHES)
    val = fixed_batches(work_units(version, "val"), pre, BATCH, VAL_BATCHES)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(task, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    gates = [m for m in task.modules() if hasattr(m, "attn_gate")]
    start = time.perf_counter()
    for step in range(steps):
        warm = (step + 1) / o.warmup_steps
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - o.warmup_steps) / (steps - o.warmup_steps)))
        for group in opt.param_groups:
            group["lr"] = o.lr * (warm if step < o.warmup_steps else cosine)
        loss = task(train[step % len(train)])["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), o.grad_clip)
        opt.step()
    task.eval()
    with torch.no_grad():
        with_image = sum(task(b)["loss"].item() for b in val) / len(val)
        opened = [torch.tanh(scale * g.attn_gate).abs().item() for g in gates]
        for g in gates:
            g.attn_gate.zero_()
            g.mlp_gate.zero_()
        without = sum(task(b)["loss"].item() for b in val) / len(val)
    return {"scale": scale, "val": with_image, "closed": without, "gates": opened,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--parent", default="models:/mmpipe-contrastive@champion")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home

    from mmcore import tracking
    from mmcore.config import TrackingConfig
    from mmcore.data.dataset import DatasetVersion
    from mmcore.models import model_config
    from mmcore.recipes import recipe
    from mmcore.train.parents import pin_parents

    uri = tracking.resolve_uri(TrackingConfig())
    version = DatasetVersion.open(args.dataset)
    cfg = recipe("demo-flamingo", args.dataset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, parent=args.parent))
    pinned = pin_parents(cfg, model_config(cfg.model.name), uri, version)
    rows = []
    for scale in args.scales:
        r = trial(pinned.cfg, pinned.arch, version, uri, scale, args.steps)
        print(f"gate_scale {scale:g}: val loss {r['val']:.3f}, gates zeroed {r['closed']:.3f}, "
              f"attention gates |tanh| max {max(r['gates']):.3f} ({r['seconds']:.0f} s)", flush=True)
        rows.append(f"| {scale:g} | {r['val']:.3f} | {r['closed']:.3f} | {r['closed'] - r['val']:.3f} | "
                    f"{', '.join(f'{g:.2f}' for g in r['gates'])} | {r['seconds']:.0f} |")
    body = "\n".join([
        "## Fusion: Flamingo's gate scale", "",
        f"Command: `.venv/bin/python bench/flamingo_gates.py --home HOME --dataset DIR --parent {args.parent} "
        f"--steps {args.steps}`", "",
        f"`flamingo-demo` on the frozen tower of {pinned.cfg.model.parent}, one process, plain AdamW with the "
        f"`demo-flamingo` recipe's lr schedule squeezed into {args.steps} steps of {BATCH} (the same "
        f"{TRAIN_BATCHES} train batches, cycled), validation loss on {VAL_BATCHES} val batches. 'Gates zeroed': "
        "the same model with every gate at zero, i.e. its LM without the image; the gap is what the image "
        "is worth.", "",
        "| gate_scale | val loss | gates zeroed | gap | attention gates, tanh(scale * a) by block | seconds |",
        "|---|---|---|---|---|---|", *rows])
    print(body)
    write_section("flamingo-gates", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
