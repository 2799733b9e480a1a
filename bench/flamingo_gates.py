"""Flamingo's tanh gates: does the image get in? The demo Flamingo trained with each gate_scale.

The same `flamingo-demo` model on a home's contrastive parent, trained in one process with plain
AdamW on the fusion task's batches (the batch, optimizer, schedule and clipping that fit() would give
DeepSpeed for the demo-flamingo recipe at --steps steps; the same fixed batches for every scale; no
Ray, so three scales fit in minutes), then: validation loss, the
same with every gate set to zero (the LM alone, without the image), and how far the gates opened.
A gate that stays near zero leaves a Flamingo that answers from the question alone.
Usage:
  python bench/flamingo_gates.py --home HOME --dataset DIR [--parent models:/mmpipe-contrastive@champion]
         [--scales 1 10 30] [--steps 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import warmup_cosine, write_section  # noqa: E402

from mmcore.models.flamingo import GatedCrossAttention  # noqa: E402

TRAIN_BATCHES, VAL_BATCHES = 60, 6


def trial(cfg, arch: dict, tokenizer_json: str, parents: dict, train: list, val: list, scale: float) -> dict:
    """Train flamingo-demo with this gate_scale on `train`, cycled; validation loss with and without the gates."""
    import torch

    from mmcore.tasks import build_task
    from mmcore.train.deepspeed_config import build_ds_config
    from mmcore.train.parallel import param_groups

    torch.manual_seed(cfg.seed)
    task, _ = build_task(cfg, {**arch, "gate_scale": scale}, tokenizer_json, parents)
    ds = build_ds_config(cfg, "fp32")  # the optimizer and schedule fit() would run
    adamw, factor = ds["optimizer"]["params"], warmup_cosine(ds["scheduler"]["params"])
    opt = torch.optim.AdamW(param_groups(task, adamw["weight_decay"]), lr=adamw["lr"], betas=tuple(adamw["betas"]),
                            eps=adamw["eps"])
    gates = [m for m in task.modules() if isinstance(m, GatedCrossAttention)]
    start = time.perf_counter()
    for step in range(cfg.optim.max_steps):
        for group in opt.param_groups:
            group["lr"] = adamw["lr"] * factor(step)
        loss = task(train[step % len(train)])["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), ds["gradient_clipping"])
        opt.step()
    task.eval()
    with torch.no_grad():
        with_image = sum(task(b)["loss"].item() for b in val) / len(val)
        opened = [torch.tanh(g.scale * g.attn_gate).abs().item() for g in gates]
        for g in gates:
            g.attn_gate.zero_()
            g.mlp_gate.zero_()
        without = sum(task(b)["loss"].item() for b in val) / len(val)
    return {"val": with_image, "closed": without, "gates": opened, "seconds": time.perf_counter() - start}


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
    from mmcore.data.units import fixed_batches, work_units
    from mmcore.models import model_config
    from mmcore.recipes import recipe
    from mmcore.stages import STAGES
    from mmcore.tasks import build_task
    from mmcore.train.parents import pin_parents

    uri = tracking.resolve_uri(TrackingConfig())
    version = DatasetVersion.open(args.dataset)
    cfg = recipe("demo-flamingo", args.dataset)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, parent=args.parent),
                              optim=dataclasses.replace(cfg.optim, max_steps=args.steps))
    pinned = pin_parents(cfg, model_config(cfg.model.name), uri, version)
    tokenizer_json = STAGES["fusion"].task.tokenizer(version.tokenizer_path.read_text())
    _, preprocess = build_task(pinned.cfg, pinned.arch, tokenizer_json)  # sizes the preprocessing only
    pre = STAGES["fusion"].task.preprocessor(pinned.cfg, preprocess, tokenizer_json)
    train = fixed_batches(work_units(version, "train"), pre, pinned.cfg.data.batch_size, TRAIN_BATCHES)
    val = fixed_batches(work_units(version, "val"), pre, pinned.cfg.data.batch_size, VAL_BATCHES)
    rows = []
    for scale in args.scales:
        r = trial(pinned.cfg, pinned.arch, tokenizer_json, pinned.dirs, train, val, scale)
        print(f"gate_scale {scale:g}: val loss {r['val']:.3f}, gates zeroed {r['closed']:.3f}, "
              f"attention gates |tanh| max {max(r['gates']):.3f} ({r['seconds']:.0f} s)", flush=True)
        rows.append(f"| {scale:g} | {r['val']:.3f} | {r['closed']:.3f} | {r['closed'] - r['val']:.3f} | "
                    f"{', '.join(f'{g:.2f}' for g in r['gates'])} | {r['seconds']:.0f} |")
    body = "\n".join([
        "## Fusion: Flamingo's gate scale", "",
        f"Command: `.venv/bin/python bench/flamingo_gates.py --home HOME --dataset DIR --parent {args.parent} "
        f"--steps {args.steps}`", "",
        f"`flamingo-demo` on the frozen tower of {pinned.cfg.model.parent}, one process, plain AdamW with the "
        f"`demo-flamingo` recipe's optimizer, lr schedule and clipping at {args.steps} steps of "
        f"{pinned.cfg.data.batch_size} (the same "
        f"{TRAIN_BATCHES} train batches, cycled), validation loss on {VAL_BATCHES} val batches. 'Gates zeroed': "
        "the same model with every gate at zero, i.e. its LM without the image; the gap is what the image "
        "is worth.", "",
        "| gate_scale | val loss | gates zeroed | gap | attention gates, tanh(scale * a) by block | seconds |",
        "|---|---|---|---|---|---|", *rows])
    print(body)
    write_section("flamingo-gates", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
