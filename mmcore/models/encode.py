"""Batched embedding of raw inputs with a contrastive model and its preprocessor (no grad)."""

from __future__ import annotations

import numpy as np
import torch


def embed_images(model, preprocess, images: list[bytes], batch_size: int = 256) -> np.ndarray:
    """Encoded image bytes -> (N, E) unit-norm embeddings."""
    with torch.no_grad():
        return np.concatenate([model.encode_image(torch.from_numpy(preprocess.images(images[i:i + batch_size])))
                               .numpy() for i in range(0, len(images), batch_size)])


def embed_texts(model, preprocess, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Texts -> (N, E) unit-norm embeddings."""
    with torch.no_grad():
        return np.concatenate([model.encode_text(torch.from_numpy(preprocess.tokens(texts[i:i + batch_size])))
                               .numpy() for i in range(0, len(texts), batch_size)])
