"""What a contrastive tower's patch tokens say about each group of a two-group scene.

A linear probe (logistic regression) reads a group's shape and colour from the tower's patch
tokens averaged over the region the sample corpus draws that group in (synthetic.corpus.REGIONS), trained
on train-split scenes and scored on test-split scenes, for several tower layers; and the first
group's shape from the CLS token. If a group's shape is not in its patch tokens, no fusion model on
the frozen tower can answer "what colour is the circle?" when two groups share the picture.
Usage:
  python experiments/fusion-binding/tower_probe.py --home HOME --dataset DIR [--model models:/mmpipe-contrastive@champion]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # bench/common.py

from common import measured  # noqa: E402

LAYERS = (-1, -2, -3)
ATTRIBUTES = (("shape", 0), ("color", 0), ("shape2", 1), ("color2", 1))


def scenes(version, split: str, limit: int) -> list[dict]:
    columns = ["image", "source", "shape", "color", "relation", "shape2", "color2"]
    rows = version.read(split, columns=columns).to_pylist()
    return [r for r in rows if r["source"] == "synthetic" and r["relation"]][:limit]


def region_features(tower, preprocess, rows: list[dict], layer: int) -> np.ndarray:
    """(N, 3, D): the mean patch token over the first group's region, the second's, and the CLS token."""
    import torch

    from mmcore.data.synthetic.corpus import REGIONS

    grid = tower.cfg.image_size // tower.cfg.patch_size
    centre = (np.arange(grid) + 0.5) / grid
    out = []
    for i in range(0, len(rows), 256):
        chunk = rows[i:i + 256]
        with torch.no_grad():
            tokens = tower(torch.from_numpy(preprocess.images([r["image"] for r in chunk])), layer)
        patches = tokens[:, 1:].reshape(len(chunk), grid, grid, -1)
        for row, grid_tokens, cls in zip(chunk, patches, tokens[:, 0]):
            pooled = []
            for x0, y0, x1, y1 in REGIONS[row["relation"]]:
                inside = (centre[None, :] >= x0) & (centre[None, :] < x1) & (centre[:, None] >= y0) & (centre[:, None] < y1)
                pooled.append(grid_tokens[torch.from_numpy(inside)].mean(0).numpy())
            out.append(pooled + [cls.numpy()])
    return np.array(out)


def probe(train_x: np.ndarray, train_y: list, test_x: np.ndarray, test_y: list) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(model.fit(train_x, train_y).score(test_x, test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", default="models:/mmpipe-contrastive@champion")
    args = parser.parse_args()
    os.environ["MMPIPE_HOME"] = args.home
    from mmcore import registry, tracking
    from mmcore.config import TrackingConfig
    from mmcore.data.dataset import DatasetVersion

    model, preprocess = registry.load_model(args.model, tracking.resolve_uri(TrackingConfig()))
    tower = model.visual.eval()
    version = DatasetVersion.open(args.dataset)
    train, test = scenes(version, "train", 3000), scenes(version, "test", 1000)
    rows = ["| tower layer | " + " | ".join(f"{a} (region of group {g + 1})" for a, g in ATTRIBUTES)
            + " | first shape from CLS |", "|---|" + "---|" * (len(ATTRIBUTES) + 1)]
    for layer in [layer for layer in LAYERS if layer >= -tower.cfg.layers - 1]:
        a, b = region_features(tower, preprocess, train, layer), region_features(tower, preprocess, test, layer)
        scores = [probe(a[:, g], [r[attr] for r in train], b[:, g], [r[attr] for r in test]) for attr, g in ATTRIBUTES]
        scores.append(probe(a[:, 2], [r["shape"] for r in train], b[:, 2], [r["shape"] for r in test]))
        rows.append(f"| {layer} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")
    command = ".venv/bin/python experiments/fusion-binding/tower_probe.py --home HOME --dataset DIR"
    command += "" if args.model == parser.get_default("model") else f" --model {args.model}"
    body = "\n".join(["## Fusion: what the frozen tower's patch tokens hold", "", f"Command: `{command}`", "",
                      f"{args.model} on {len(train)} train / {len(test)} test two-group scenes; a linear probe "
                      "on standardized features. Chance: shape 1/3, colour 1/6.", ""] + rows + ["", measured()])
    print(body)


if __name__ == "__main__":
    main()
