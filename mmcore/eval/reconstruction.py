"""The suite for image tokenizers: how well decode(encode(image)) gives the image back, and how much
of the codebook the test split uses."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mmcore.data.images import png_bytes
from mmcore.eval.contrastive import rows
from mmcore.eval.suites import SuiteError, SuiteResult, suite

GRID_EXAMPLES = 8
"""Originals (top row) and their reconstructions (bottom row) per source in the logged figure."""


def reconstruct(model, preprocess, blobs: list[bytes], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encoded images -> (originals, reconstructions) as (N, S, S, 3) uint8, and the codes (N, tokens)."""
    originals, rebuilt, codes = [], [], []
    with torch.no_grad():
        for start in range(0, len(blobs), batch_size):
            pixels = torch.from_numpy(preprocess.images(blobs[start: start + batch_size]))
            batch_codes = model.encode(pixels)
            originals.append(preprocess.to_uint8(pixels))
            rebuilt.append(preprocess.to_uint8(model.decode(batch_codes)))
            codes.append(batch_codes.numpy())
    return np.concatenate(originals), np.concatenate(rebuilt), np.concatenate(codes)


def psnr_per_image(originals: np.ndarray, rebuilt: np.ndarray) -> np.ndarray:
    """PSNR in dB of each uint8 image pair (peak 255); identical images count as 100 dB."""
    mse = ((originals.astype(np.float64) - rebuilt.astype(np.float64)) ** 2).reshape(len(originals), -1).mean(1)
    return np.where(mse > 0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), 100.0)


def _grid_png(pairs: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    side = pairs[0][0].shape[0]
    canvas = Image.new("RGB", (side * len(pairs), side * 2), "white")
    for i, (original, rebuilt) in enumerate(pairs):
        canvas.paste(Image.fromarray(original), (i * side, 0))
        canvas.paste(Image.fromarray(rebuilt), (i * side, side))
    return png_bytes(canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST))


@suite("reconstruction", {"tokenize_image"}, "PSNR of decode(encode(image)) per source; share of the codebook used",
       kinds=("captions", "instructions"))
def reconstruction(model, preprocess, version) -> SuiteResult:
    has_source = "source" in version.manifest["source"].get("extras", [])
    records = rows(version, ["image", "source"] if has_source else ["image"]).to_pylist()
    if not records:
        raise SuiteError(f"reconstruction: dataset {version.id} has no test rows")
    originals, rebuilt, codes = reconstruct(model, preprocess, [r["image"] for r in records])
    scores = psnr_per_image(originals, rebuilt)
    sources = np.array([r.get("source") or "all" for r in records])
    counts = np.bincount(codes.ravel(), minlength=model.codebook_size)
    used = counts / counts.sum()
    entropy = -float((used[used > 0] * np.log(used[used > 0])).sum())
    metrics = {"psnr": float(scores.mean()), "codebook_usage": float((counts > 0).mean()),
               "codebook_perplexity": math.exp(entropy), "tokens_per_image": float(codes.shape[1]),
               "n": float(len(records))}
    per_source = pd.DataFrame({"source": sources, "psnr": scores}).groupby("source").psnr.agg(["mean", "size"])
    if has_source:
        metrics.update({f"psnr_{name.replace('-', '_')}": float(row["mean"]) for name, row in per_source.iterrows()})
    figures = {}
    for name in np.unique(sources):
        picked = np.flatnonzero(sources == name)[:GRID_EXAMPLES]
        figures[f"reconstructions_{name}.png"] = _grid_png([(originals[i], rebuilt[i]) for i in picked])
    return SuiteResult(metrics, "psnr", tables={"per_source": per_source.reset_index()}, figures=figures)
