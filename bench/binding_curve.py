"""How many questions a fresh LLaVA projector + LM needs before it binds: the learning curve of
two-group questions (relation, by default) on a frozen tower's cached patch tokens.

The fusion demo answers the relation of two groups at about the 0.5 of naming the right axis
(left/right against above/below) and guessing the side. This bench asks whether that is the tower
or the LM: the same LLaVA architecture as a registered fusion model, freshly initialised, trains
in one process on questions of the chosen types only, reading either the tower's patch tokens
(computed once: the tower is frozen and nothing is augmented) or the raw 8x8 pixel patches, and
is scored on the test split's two-group scenes (exact match of the greedy answer tokens, teacher
forced) every `--every` steps. AdamW without weight decay, the lr a linear warm-up over 50 steps
times a cosine to zero over the run, global-norm clipping at 1.0. Variants: the LM's heads, the
patch rows' and columns' initial std, and the fusion task's loss on the questions' tokens.
Usage:
  python bench/binding_curve.py --home HOME --dataset DIR [--model models:/mmpipe-fusion@candidate]
      [--kinds relation] [--steps 2000] [--lr 2e-3] [--input tower|pixels] [--heads N]
      [--positions-std S] [--question-loss W]
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

from common import pinned_model, write_section  # noqa: E402

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


def fresh_llava(registered, token_width: int, heads: int = 0, positions_std: float | None = None):
    """A freshly initialised LLaVA of `registered`'s architecture reading image tokens `token_width`
    wide (the tower's or pixel patches), without a tower: its image tokens are computed once. `heads`
    and `positions_std` (the patch rows' and columns' initial std) replace the registered model's."""
    from torch import nn

    if registered.family != "llava":
        raise SystemExit(f"a {registered.family} model; this bench rebuilds a LLaVA")
    cfg = copy.deepcopy(registered.cfg)
    cfg.lm.heads = heads or cfg.lm.heads
    model = type(registered)(cfg, registered.eos_id)
    del model.visual
    if positions_std is not None and cfg.image_positions:
        for grid in (model.patch_row, model.patch_column):
            nn.init.normal_(grid, std=positions_std)
    model.projector = nn.Sequential(nn.Linear(token_width, cfg.lm.width), nn.GELU(),
                                    nn.Linear(cfg.lm.width, cfg.lm.width))
    return model


def encode(chat, asked):
    """Questions -> (input_ids, labels), each (B, context)."""
    import torch

    encoded = [chat.encode(q.question, q.answer) for q in asked]
    return torch.tensor([e[0] for e in encoded]), torch.tensor([e[1] for e in encoded])


def exact_match(model, chat, tokens, pairs: list[tuple[int, object]]) -> dict[str, float]:
    """Share of (row, question) pairs whose answer tokens are all the model's argmax, per question type."""
    import torch

    from mmcore.models.generate import IGNORE

    model.eval()
    right, total = {}, {}
    with torch.no_grad():
        for start in range(0, len(pairs), 256):
            chunk = pairs[start:start + 256]
            ids, labels = encode(chat, [q for _, q in chunk])
            logits = model.head(model.hidden(ids, model.project(tokens[[i for i, _ in chunk]])))
            targets = labels[:, 1:]
            exact = ((logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE)).all(1)
            for (_, q), ok in zip(chunk, exact.tolist()):
                right[q.kind] = right.get(q.kind, 0) + ok
                total[q.kind] = total.get(q.kind, 0) + 1
    model.train()
    return {k: right[k] / total[k] for k in sorted(total)}


def curve(args) -> tuple[list[tuple[int, float, dict]], dict]:
    import torch

    from mmcore.data.dataset import DatasetVersion
    from mmcore.data.instruct import ChatFormat, questions, training_questions
    from mmcore.models.fusion import loss_on_answers
    from mmcore.tasks import question_labels
    from mmcore.registry import load_model

    torch.manual_seed(args.seed)
    registered, preprocess = load_model(args.model)
    version = DatasetVersion.open(args.dataset)
    train, test = two_group_rows(version, "train"), two_group_rows(version, "test")
    tower = registered.visual.eval()
    train_x, test_x = (image_tokens(tower, preprocess, rows, args.input) for rows in (train, test))
    model = fresh_llava(registered, train_x.shape[-1], args.heads, args.positions_std)
    chat, kinds = ChatFormat.of(preprocess), set(args.kinds)
    test_pairs = [(i, q) for i, row in enumerate(test) for q in questions(row) if q.kind in kinds]

    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = np.random.default_rng(args.seed)
    points, losses, started = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        index = rng.integers(0, len(train), args.batch)
        # one question of the chosen kinds per row, drawn like training draws them
        asked = [next(q for q in training_questions(train[i], args.seed, step) if q.kind in kinds) for i in index]
        ids, labels = encode(chat, asked)
        logits = model.head(model.hidden(ids, model.project(train_x[torch.from_numpy(index)])))
        loss = loss_on_answers(logits, labels)
        if args.question_loss:  # the fusion task's task.question_loss
            loss = loss + args.question_loss * loss_on_answers(logits, question_labels(ids, labels))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.every == 0:
            points.append((step, float(np.mean(losses[-args.every:])), exact_match(model, chat, test_x, test_pairs)))
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
    parser.add_argument("--heads", type=int, default=0, help="the LM's attention heads (default: the model's)")
    parser.add_argument("--positions-std", type=float, default=None,
                        help="initial std of the patch rows and columns (default: the model's, 0.2)")
    parser.add_argument("--question-loss", type=float, default=0.0,
                        help="weight of a next-token loss on the question's tokens beside the answer's (default 0)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the initialisation and the draw of scenes and questions")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    args.model = pinned_model(args.model)
    points, facts = curve(args)
    kinds = sorted(points[0][2])
    lines = [f"| step | questions seen | train loss | {' | '.join(f'test {k}' for k in kinds)} |",
             "|---|---|---|" + "---|" * len(kinds)]
    lines += [f"| {step} | {step * args.batch} | {loss:.3f} | {' | '.join(f'{acc[k]:.3f}' for k in kinds)} |"
              for step, loss, acc in points]
    print("\n".join(lines))
    variant = (f" --heads {args.heads}" if args.heads else "") + \
        (f" --positions-std {args.positions_std}" if args.positions_std is not None else "") + \
        (f" --question-loss {args.question_loss}" if args.question_loss else "")
    command = (f"python bench/binding_curve.py --home HOME --dataset DIR --model {args.model} --kinds "
               f"{' '.join(args.kinds)} --input {args.input} --steps {args.steps} --lr {args.lr} --seed {args.seed}"
               f"{variant}")
    body = "\n".join([
        f"## Fusion: how many questions binding takes ({args.input} input, seed {args.seed}"
        f"{',' + variant if variant else ''})", "", f"Command: `{command}`", "",
        f"A fresh LLaVA of {args.model}'s architecture (its weights unused), one process, on the "
        f"{'frozen tower patch tokens' if args.input == 'tower' else 'raw 8x8 pixel patches'} of the "
        f"{facts['train']} two-group train scenes of dataset {facts['version']}, one {'/'.join(args.kinds)} "
        f"question per scene and step, batch {args.batch}, lr {args.lr}; exact-match accuracy on the "
        f"{facts['test']} two-group test scenes (seen wordings). {facts['seconds']:.0f} s in all.",
        "", *lines])
    name = f"binding-curve-{args.input}-seed{args.seed}" + variant.replace(" --", "-").replace(" ", "")
    write_section(name, body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
