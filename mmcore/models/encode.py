"""Batched inference on raw inputs (no grad): embeddings of a contrastive model, answers and scores of a fusion model."""

from __future__ import annotations

import numpy as np
import torch

from mmcore.data.instruct import ChatFormat


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


def generate_answers(model, preprocess, images: list[bytes], prompts: list[str], max_new_tokens: int = 16,
                     temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 64,
                     histories: list[list] | None = None) -> list[str]:
    """A fusion model's answer to each (image, prompt), in the chat format it was trained with; with
    `histories`, each prompt follows its conversation's earlier turns (data.instruct.Question).

    Rows are batched by prompt length (no padding inside a batch: a row's answer does not depend on
    its neighbours). A prompt that does not leave room for an answer in the context is a ValueError
    naming the row and the limit.
    """
    chat = ChatFormat.of(preprocess)
    encoded = [chat.prompt(p, h) for p, h in zip(prompts, histories or [()] * len(prompts))]
    for row, ids in enumerate(encoded):
        if len(ids) >= chat.context_length:
            raise ValueError(f"row {row}: the prompt is {len(ids)} tokens with the chat format; this model's "
                             f"context is {chat.context_length} tokens, answer included")
    answers = [""] * len(prompts)
    for chunk in same_length_batches(encoded, batch_size):
        pixels = torch.from_numpy(preprocess.images([images[r] for r in chunk]))
        new = model.generate(pixels, torch.tensor([encoded[r] for r in chunk]), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p)
        for r, ids in zip(chunk, new.tolist()):
            answers[r] = chat.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def score_answers(model, preprocess, images: list[bytes], prompts: list[str], answers: list[str],
                  batch_size: int = 64) -> np.ndarray:
    """log p(answer | image, prompt) under a fusion model, summed over the answer's tokens: (N,)."""
    chat = ChatFormat.of(preprocess)
    scores = []
    for i in range(0, len(prompts), batch_size):
        encoded = [chat.encode(p, a) for p, a in zip(prompts[i: i + batch_size], answers[i: i + batch_size])]
        scores.append(model.score(torch.from_numpy(preprocess.images(images[i: i + batch_size])),
                                  torch.tensor([e[0] for e in encoded]), torch.tensor([e[1] for e in encoded])).numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def draw_images(model, preprocess, prompts: list[str], temperature: float = 1.0, top_k: int = 0,
                guidance: float = 1.0, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """A unified model's image for each text prompt: (N, S, S, 3) uint8, drawn in batches of prompts of
    one token length (the chat format's drawing prompt, as the drawing samples were trained; an empty one is
    the unconditional prompt of guidance). A prompt that leaves no room for the image in the context is a
    ValueError naming the row and the limit."""
    chat = ChatFormat.of(preprocess)
    encoded = [chat.drawing_prompt(p)[0] for p in prompts]
    for row, ids in enumerate(encoded):
        if len(ids) > preprocess.cfg.context_length - 2:
            raise ValueError(f"row {row}: the prompt is {len(ids)} tokens; this model draws after at most "
                             f"{preprocess.cfg.context_length - 2}")
    unconditional = torch.tensor([chat.drawing_prompt("")[0]])
    side = preprocess.cfg.image_size
    out = np.zeros((len(prompts), side, side, 3), np.uint8)
    generator = torch.Generator().manual_seed(seed)
    for chunk in same_length_batches(encoded, batch_size):
        images = model.generate_image(torch.tensor([encoded[r] for r in chunk]), temperature=temperature,
                                      top_k=top_k, guidance=guidance, generator=generator,
                                      unconditional=unconditional)
        out[chunk] = preprocess.to_uint8(images)
    return out


def same_length_batches(encoded: list[list[int]], batch_size: int):
    """Row indices in batches whose token lists have one length (no padding inside a batch: a row's
    output does not depend on its neighbours)."""
    by_length: dict[int, list[int]] = {}
    for row, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(row)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            yield rows[start: start + batch_size]
