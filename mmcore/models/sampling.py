"""The one next-token sampler every generating model uses: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. Greedy when temperature is 0; else a draw from softmax(logits /
    temperature) over the k likeliest (top_k > 0) and the smallest set whose probability reaches top_p
    (top_p < 1), in vocabulary order."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # beyond the smallest set reaching top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -torch.inf)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
