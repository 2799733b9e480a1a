"""A decoder-only language model (GPT-2 style: pre-norm, causal, learned positions).

The fusion families put image information into it from outside: LLaVA splices projected image
tokens into its input embeddings, Flamingo inserts gated cross-attention between its layers (the
`between` hook). It trains from scratch on the dataset's text: no LM weights can be fetched here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mmcore.models.transformer import Block, KVCache


@dataclass
class DecoderConfig:
    """The language model of a fusion model."""

    context_length: int = 48
    """Text tokens per sample (prompt and answer); longer samples are truncated and counted."""
    vocab_size: int = 4096
    """Set from the stage's tokenizer (the dataset's BPE plus the chat tokens) when built."""
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = False
    """LayerNorm on queries and keys per head (Chameleon; the unified stage's default)."""

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"lm.width {self.width} is not divisible by heads {self.heads}")
        if self.context_length < 8:
            raise ValueError(f"lm.context_length {self.context_length} is below 8")


@dataclass
class Packing:
    """Several sequences in each row of a batch after one shared prefix (the fusion stage's questions
    about one image, data/instruct.py): each sees the prefix and itself only, at the positions it
    would have alone, so its logits are the ones it would get alone."""

    segments: torch.Tensor
    """(B, N): 0 on the shared prefix, k on the k-th sequence, -1 on padding."""
    positions: torch.Tensor
    """(B, N): each token's position in its own sequence."""

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> "Packing | None":
        """A training batch's packing (its "segments" and "positions", data.pack_length), None unpacked."""
        return cls(batch["segments"], batch["positions"]) if "segments" in batch else None

    def mask(self) -> torch.Tensor:
        """(B, 1, N, N) bool: token i sees token j <= i of the prefix or of its own sequence."""
        s, n = self.segments, self.segments.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
        return (causal & ((s[:, None, :] == 0) | (s[:, None, :] == s[:, :, None])))[:, None]


Between = Callable[[int, torch.Tensor], torch.Tensor]
"""between(i, hidden) -> hidden, applied before decoder layer i (Flamingo's cross-attention)."""


class DecoderLM(nn.Module):
    """Embeddings (B, N, D) at positions start..start+N-1 -> hidden states (B, N, D); logits() reads them out."""

    def __init__(self, cfg: DecoderConfig, max_positions: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, max_positions, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qk_norm)
                                    for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        # Not tied to the embedding: under ZeRO-3 a weight is gathered only inside its own module's forward.
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def max_positions(self) -> int:
        return self.pos.shape[1]

    def forward(self, x: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None,
                between: Between | None = None, packing: Packing | None = None) -> torch.Tensor:
        if packing is None and start + x.shape[1] > self.pos.shape[1]:
            raise ValueError(f"sequence of {start + x.shape[1]} positions is longer than the model's "
                             f"{self.pos.shape[1]}")
        x = x + (self.pos[:, start: start + x.shape[1]] if packing is None else self.pos[0, packing.positions])
        mask = None if packing is None else packing.mask()
        for i, block in enumerate(self.blocks):
            if between is not None:
                x = between(i, x)
            x = block(x, mask=mask, causal=True, cache=caches[i] if caches is not None else None)
        return self.ln_f(x)

    def new_caches(self) -> list[KVCache]:
        return [{} for _ in self.blocks]
