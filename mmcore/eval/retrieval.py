"""Image-to-text and text-to-image retrieval recall@k, with the chance level for comparison.

Captions repeat in templated and synthetic data ("a red circle" describes many images), so
image-to-text ranks the distinct captions (copies of one text would otherwise fill the top k with
one answer) and a retrieved caption counts as right when its text equals the image's caption;
text-to-image ranks every image, and one is right when its caption equals the query. Each
direction's chance@k (`chance_<metric>`) is computed the same way.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pyarrow as pa

from mmcore.models.encode import embed_images, embed_texts


def embed(model, preprocess, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings (N, E), caption embeddings (N, E)) of a table with image and caption columns."""
    return (embed_images(model, preprocess, table.column("image").to_pylist()),
            embed_texts(model, preprocess, table.column("caption").to_pylist()))


def _recall(similarity: np.ndarray, same: np.ndarray, k: int) -> float:
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(same, top, axis=1).any(axis=1).mean())


def _chance(same: np.ndarray, k: int) -> float:
    n = same.shape[1]
    matches = same.sum(axis=1)
    return float(np.mean([1 - comb(n - m, k) / comb(n, k) for m in matches]))


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, captions: list[str],
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """recall@k both ways, and each one's chance@k, over N images and their N captions."""
    first = {}  # distinct caption -> its first row
    for row, caption in enumerate(captions):
        first.setdefault(caption, row)
    codes = {caption: u for u, caption in enumerate(first)}
    ids = np.array([codes[c] for c in captions])
    distinct = ids[:, None] == np.arange(len(first))[None, :]  # (N, U): distinct caption u is image i's
    same = ids[:, None] == ids[None, :]  # (N, N): image j's caption is query i's text
    to_text = image_emb @ text_emb[list(first.values())].T
    to_image = text_emb @ image_emb.T
    out = {}
    for k in ks:
        if k <= len(first):
            out[f"image_to_text_recall_{k}"] = _recall(to_text, distinct, k)
            out[f"chance_image_to_text_recall_{k}"] = _chance(distinct, k)
        if k <= len(captions):
            out[f"text_to_image_recall_{k}"] = _recall(to_image, same, k)
            out[f"chance_text_to_image_recall_{k}"] = _chance(same, k)
    out["n"] = float(len(captions))
    return out
