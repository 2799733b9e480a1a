"""The first step of binding with the question's work done for the model: one attention layer,
its query the asked group's colour, finds that group among the image tokens and says which half of
the image it is in.

The fusion LM has to learn two things before it answers "where are the red circles relative to the
blue square?": to build, at the answer, a query out of the question's words (the first group's
colour, not the second's), and to find the image tokens that match it. `bench/binding_curve.py`
measures both together. This bench gives the query directly (a learned embedding of the colour) and
keeps LLaVA's image path (the 2-layer projector and the patch rows and columns of `image_positions`,
initialised at `--positions-std`), so the steps it takes are what the lookup alone costs, on the
frozen tower's patch tokens of a registered model or on raw 8x8 pixel patches. Each step asks about
one of the two groups of 64 two-group train scenes, drawn at random; scored on the test split's
two-group scenes, each asked about one group drawn once.
Usage:
  python bench/lookup_probe.py --home HOME --dataset DIR [--model models:/mmpipe-fusion@candidate]
      [--steps 600] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from binding_curve import image_tokens, two_group_rows  # noqa: E402
from common import pinned_model, write_section  # noqa: E402

SIDES = ("left of", "right of", "above", "below")
"""Where the asked group is, as the relation of that group to the other one: the four answers."""


def asked(rows: list[dict], second: np.ndarray):
    """(colour index, side index) of the first group, or of the second where `second`."""
    import torch

    from mmcore.data.sample import COLORS, OPPOSITE

    colours = list(COLORS)
    return torch.tensor([(colours.index(r["color2"]), SIDES.index(OPPOSITE[r["relation"]])) if s else
                         (colours.index(r["color"]), SIDES.index(r["relation"])) for r, s in zip(rows, second)])


def lookup_model(token_width: int, width: int, heads: int, grid: int, positions_std: float, colours: int):
    import torch
    from torch import nn

    from mmcore.models.transformer import CrossAttention

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = nn.Sequential(nn.Linear(token_width, width), nn.GELU(), nn.Linear(width, width))
            self.row = nn.Parameter(torch.randn(grid, 1, width) * positions_std)
            self.column = nn.Parameter(torch.randn(1, grid, width) * positions_std)
            self.colour = nn.Embedding(colours, width)
            self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(width)
            self.attn = CrossAttention(width, heads)
            self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                      nn.Linear(width, len(SIDES)))

        def forward(self, tokens, colour):
            x = self.projector(tokens)
            x = torch.cat([x[:, :1], x[:, 1:] + (self.row + self.column).flatten(0, 1)], 1)
            q = self.colour(colour)[:, None]
            return self.head(q + self.attn(self.ln_q(q), self.ln_kv(x)))[:, 0]

    return Lookup()


def run(x, test_x, train, test, args, seed: int, positions_std: float, lm) -> list[float]:
    """Test accuracy every --every steps."""
    import torch

    from mmcore.data.sample import COLORS

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    test_asked = asked(test, np.random.default_rng(1000 + seed).random(len(test)) < 0.5)
    grid = int(round((x.shape[1] - 1) ** 0.5))
    model = lookup_model(x.shape[-1], lm.width, lm.heads, grid, positions_std, len(COLORS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    out = []
    for step in range(1, args.steps + 1):
        index = rng.integers(0, len(train), args.batch)
        target = asked([train[i] for i in index], rng.random(args.batch) < 0.5)
        loss = torch.nn.functional.cross_entropy(model(x[torch.from_numpy(index)], target[:, 0]), target[:, 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            with torch.no_grad():
                out.append((model(test_x, test_asked[:, 0]).argmax(1) == test_asked[:, 1]).float().mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="the project home whose registry holds the model")
    parser.add_argument("--dataset", required=True, help="a dataset version directory")
    parser.add_argument("--model", default="models:/mmpipe-fusion@candidate",
                        help="a registered LLaVA: its tower and its LM's width and heads are used")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default docs/benchmarks.md)")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from mmcore.data.dataset import DatasetVersion
    from mmcore.registry import load_model

    args.model = pinned_model(args.model)
    registered, preprocess = load_model(args.model)
    version = DatasetVersion.open(args.dataset)
    train, test = two_group_rows(version, "train"), two_group_rows(version, "test")
    started = time.perf_counter()
    results = {}
    for source in ("tower", "pixels"):
        x, test_x = (image_tokens(registered.visual.eval(), preprocess, rows, source) for rows in (train, test))
        for positions_std in (0.2, 0.02):
            for seed in args.seeds:
                results[source, positions_std, seed] = run(x, test_x, train, test, args, seed, positions_std,
                                                           registered.cfg.lm)
                print(source, positions_std, seed, " ".join(f"{a:.3f}" for a in results[source, positions_std, seed]),
                      flush=True)
    steps = range(args.every, args.steps + 1, args.every)
    lines = [f"| image tokens | positions std | seed | {' | '.join(f'step {s}' for s in steps)} |",
             "|---|---|---|" + "---|" * len(steps)]
    lines += [f"| {source} | {std} | {seed} | {' | '.join(f'{a:.2f}' for a in accuracy)} |"
              for (source, std, seed), accuracy in results.items()]
    print("\n".join(lines))
    command = (f"python bench/lookup_probe.py --home HOME --dataset DIR --model {args.model} --steps {args.steps} "
               f"--seeds {' '.join(map(str, args.seeds))}")
    body = "\n".join([
        "## Fusion: finding a group by its colour, the query given", "", f"Command: `{command}`", "",
        f"One cross-attention layer ({registered.cfg.lm.width} wide, {registered.cfg.lm.heads} heads) whose query is "
        f"a learned embedding of the asked group's colour, over LLaVA's image path (projector, patch rows and "
        f"columns at the std shown) fed the frozen tower of {args.model} or raw 8x8 pixel patches; answers "
        f"which side the group is on (4 classes, chance 0.25; the side given the axis: 0.5). {len(train)} "
        f"two-group train scenes of dataset {version.id}, batch {args.batch}, AdamW lr {args.lr}; test "
        f"accuracy on the {len(test)} two-group test scenes. {time.perf_counter() - started:.0f} s in all.",
        "", *lines])
    write_section("lookup-probe", body, **({"doc": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
