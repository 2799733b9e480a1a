"""Pre-LN transformer blocks shared by every tower (ViT, text, decoder), with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KVCache = dict[str, torch.Tensor]
"""One attention layer's cached keys and values {"k", "v"}: (B, H, T, Dh) each; filled in place."""


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, H, N, Dh)


class Attention(nn.Module):
    """Multi-head self-attention on torch's fused scaled_dot_product_attention; with `qk_norm`, a
    LayerNorm over head_dim on queries and keys (Chameleon's fix for logit growth in mixed-modal
    training)."""

    def __init__(self, width: int, heads: int, qk_norm: bool = False):
        super().__init__()
        assert width % heads == 0, "width must be divisible by heads"
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.q_norm = nn.LayerNorm(width // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(width // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, D)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if causal and past and mask is None and n > 1:  # new queries see the past and their own prefix
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None and not past)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from x (B, N, D) attend to a context (B, M, C): keys and values from the context."""

    def __init__(self, width: int, heads: int, context_width: int | None = None):
        super().__init__()
        assert width % heads == 0, "width must be divisible by heads"
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width or width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(_heads(self.q(x), self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.out(y.transpose(1, 2).reshape(x.shape))


def mlp(width: int, mlp_ratio: float = 4.0) -> nn.Sequential:
    hidden = int(width * mlp_ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class Block(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x)) (GPT-2 / ViT pre-norm)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qk_norm)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask=mask, causal=causal, cache=cache)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A stack of Blocks; activation checkpointing is applied from outside (train/parallel.py)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                depth: int | None = None) -> torch.Tensor:
        """Through the first `depth` blocks (all by default)."""
        for block in self.blocks[:depth]:
            x = block(x, mask=mask, causal=causal)
        return x
