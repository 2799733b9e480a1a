"""How many questions a fresh LLaVA projector + LM needs before it binds: the learning curve of
two-group questions (relation, by default) on a frozen tower's cached patch tokens.

The fusion demo answers the relation of two groups at about the 0.5 of naming the right axis
(left/right against above/below) and guessing the side. This bench asks whether that is the tower
or the LM: the same LLaVA architecture as a registered fusion model, freshly initialised, trains
in one process on questions of the chosen types only, reading either the tower's patch tokens
(computed once: the tower is frozen and nothing is augmented) or the raw 8x8 pixel patches, and
is scored on the test split's two-group scenes (exact match of the greedy answer tokens, teacher
forced) every `--every` steps. AdamW, linear warm-up over 50 steps then cosine to zero, global-norm
clipping at 1.0, like the recipes.
Usage:
  python bench/binding_curve.py --home HOME --dataset DIR [--model models:/mmpipe-fusion@candidate]
      [--kinds relation] [--steps 2000] [--lr 2e-3] [--input tower|pixels]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402

PATCH = 8  # pixel patches of --input pixels: 8x8x3 values each


def two_group_rows(version, split: str) -> list[dict]:
    return [r for r in version.read(split).to_pylist() if r.get("source") == "synthetic" and r.get("relation")]


def image_tokens(tower, preprocess, rows: list[dict], source: str):
    """(N, 1 + P, D): the tower's tokens, or pixel patches with their mean standing in for the CLS token."""
    import torch

    out = []
    for i in range(0, len(rows), 256):
        pixels = torch.from_numpy(preprocess.images([r["image"] for r in rows[i:i + 256]]))
        if source == "tower":
            with torch.no_grad():
                out.append(tower(pixels, -1))
            continue
        b, _, size, _ = pixels.shape
        grid = size // PATCH
        patches = pixels.reshape(b, 3, grid, PATCH, grid, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, -1)
        out.append(torch.cat([patches.mean(1, keepdim=True), patches], 1))
    return torch.cat(out)


def curve(args) -> tuple[list[tuple[int, float, dict]], dict]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.instruct import questions, training_questions
    from mmcore.models.encode import chat_format
    from mmcore.models.generate import IGNORE
    from mmcore.tracking import load_model

    torch.manual_seed(args.seed)
    registered, preprocess = load_model(args.model)
    cfg = copy.deepcopy(registered.cfg)
    if registered.family != "llava":
        raise SystemExit(f"{args.model} is a {registered.family} model; this bench rebuilds a LLaVA")
    version = DatasetVersion.open(args.dataset)
    train, test = two_group_rows(version, "train"), two_group_rows(version, "test")
    tower = registered.visual.eval()
    train_x, test_x = (image_tokens(tower, preprocess, rows, args.input) for rows in (train, test))
    model = type(registered)(cfg, registered.eos_id)
    del model.visual  # the image tokens are computed above, once
    model.projector = nn.Sequential(nn.Linear(train_x.shape[-1], cfg.lm.width), nn.GELU(),
                                    nn.Linear(cfg.lm.width, cfg.lm.width))
    chat = chat_format(preprocess)
    kinds = set(args.kinds)

    def context(tokens):
        projected = model.projector(tokens)
        if not cfg.image_positions:
            return projected
        grid = (model.patch_row + model.patch_column).flatten(0, 1)
        return torch.cat([projected[:, :1], projected[:, 1:] + grid], dim=1)

    def batch(asked):
        encoded = [chat.encode(q.question, q.answer) for q in asked]
        return torch.tensor([e[0] for e in encoded]), torch.tensor([e[1] for e in encoded])

    test_asked = [[q for q in questions(row) if q.kind in kinds] for row in test]
    test_pairs = [(i, q) for i, asked in enumerate(test_asked) for q in asked]

    @torch.no_grad()
    def score() -> dict:
        model.eval()
        right, total = {}, {}
        for start in range(0, len(test_pairs), 256):
            chunk = test_pairs[start:start + 256]
            ids, labels = batch([q for _, q in chunk])
            logits = model.head(model.hidden(ids, context(test_x[[i for i, _ in chunk]])))
            targets = labels[:, 1:]
            exact = ((logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE)).all(1)
            for (_, q), ok in zip(chunk, exact.tolist()):
                right[q.kind] = right.get(q.kind, 0) + ok
                total[q.kind] = total.get(q.kind, 0) + 1
        model.train()
        return {k: right[k] / total[k] for k in sorted(total)}

    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = np.random.default_rng(args.seed)
    points, losses, started = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        index = rng.integers(0, len(train), args.batch)
        asked = []
        for i in index:  # one question of the chosen kinds per row, drawn like training draws them
            mine = [q for q in training_questions(train[i], args.seed, step) if q.kind in kinds]
            asked.append(mine[0])
        ids, labels = batch(asked)
        logits = model.head(model.hidden(ids, context(train_x[torch.from_numpy(index)])))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.every == 0:
            points.append((step, float(np.mean(losses[-args.every:])), score()))
            print(f"step {step}: train loss {points[-1][1]:.3f}, test {points[-1][2]} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    facts = {"train": len(train), "test": len(test), "seconds": time.perf_counter() - started,
             "version": version.id}
    return points, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="the project home whose registry holds the model")
    parser.add_argument("--dataset", required=True, help="a dataset version directory")
    parser.add_argument("--model", default="models:/mmpipe-fusion@candidate",
                        help="a registered LLaVA: its tower, architecture and tokenizer are used; its weights are not")
    parser.add_argument("--kinds", nargs="+", default=["relation"],
                        choices=["relation", "yes_no", "colour", "shape", "count"])
    parser.add_argument("--input", choices=["tower", "pixels"], default="tower")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the initialisation and the draw of scenes and questions")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from mmcore.config import TrackingConfig
    from mmcore.tracking import resolve_uri, resolve_version

    args.model = "models:/{}/{}".format(*resolve_version(args.model, resolve_uri(TrackingConfig())))
    points, facts = curve(args)
    kinds = sorted(points[0][2])
    lines = [f"| step | questions seen | train loss | {' | '.join(f'test {k}' for k in kinds)} |",
             "|---|---|---|" + "---|" * len(kinds)]
    lines += [f"| {step} | {step * args.batch} | {loss:.3f} | {' | '.join(f'{acc[k]:.3f}' for k in kinds)} |"
              for step, loss, acc in points]
    print("\n".join(lines))
    command = (f"python bench/binding_curve.py --home HOME --dataset DIR --model {args.model} --kinds "
               f"{' '.join(args.kinds)} --input {args.input} --steps {args.steps} --lr {args.lr} --seed {args.seed}")
    body = "\n".join([
        f"## Fusion: how many questions binding takes ({args.input} input, seed {args.seed})", "", f"Command: `{command}`", "",
        f"A fresh LLaVA of {args.model}'s architecture (its weights unused), one process, on the "
        f"{'frozen tower patch tokens' if args.input == 'tower' else 'raw 8x8 pixel patches'} of the "
        f"{facts['train']} two-group train scenes of dataset {facts['version']}, one {'/'.join(args.kinds)} "
        f"question per scene and step, batch {args.batch}, lr {args.lr}; exact-match accuracy on the "
        f"{facts['test']} two-group test scenes (seen wordings). {facts['seconds']:.0f} s in all.",
        "", *lines])
    write_section(f"binding-curve-{args.input}-seed{args.seed}", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
