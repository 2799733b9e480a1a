"""The image tower (ViT) and the text tower (causal transformer), each returning features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcore.models.transformer import Transformer


@dataclass
class VisionConfig:
    """A ViT: patches -> [CLS, registers, patches] -> transformer."""

    image_size: int = 64
    """Input side in pixels (square)."""
    patch_size: int = 8
    """Patch side in pixels; image_size must be a multiple."""
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    registers: int = 0
    """Extra learned tokens that soak up global information (Darcet et al. 2023, "Vision
    Transformers Need Registers"); dropped from the output."""

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} is not divisible by heads {self.heads}")


@dataclass
class TextConfig:
    """A causal transformer over BPE tokens; the <eos> position pools the sequence (as in CLIP)."""

    context_length: int = 32
    vocab_size: int = 4096
    """Set from the dataset's tokenizer when the model is built for it."""
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by heads {self.heads}")


class VisionTower(nn.Module):
    """images (B, 3, H, W) -> tokens (B, 1 + P, D): the CLS token first, then the patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patchify = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.registers = nn.Parameter(torch.zeros(1, cfg.registers, cfg.width)) if cfg.registers else None
        self.pos = nn.Parameter(torch.randn(1, 1 + patches, cfg.width) * 0.02)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """`layer` picks the hidden state as Python indexes [embeddings, block 1, ..., block N]: -1 (the
        default) is the last block's output after ln_post, -2 the one before, unnormalized (the layer
        LLaVA feeds its LM: the last one is shaped by the contrastive loss towards a global summary)."""
        index = layer % (self.cfg.layers + 1)
        x = self.patchify(images).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, 1 + P, D)
        if self.registers is not None:
            x = torch.cat([x, self.registers.expand(x.shape[0], -1, -1)], dim=1)
        x = self.transformer(self.ln_pre(x), depth=index)
        x = x[:, : x.shape[1] - self.cfg.registers]
        return self.ln_post(x) if index == self.cfg.layers else x


class TextTower(nn.Module):
    """tokens (B, L) -> (sequence features (B, L, D), pooled features (B, D) at each row's <eos>)."""

    def __init__(self, cfg: TextConfig, eos_id: int):
        super().__init__()
        self.cfg, self.eos_id = cfg, eos_id
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]  # (B, L, D)
        x = self.ln_final(self.transformer(x, causal=True))
        # the first <eos> (or the last position when truncation cut it off)
        is_eos = tokens == self.eos_id
        last = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1] - 1))
        return x, x[torch.arange(x.shape[0], device=x.device), last]
