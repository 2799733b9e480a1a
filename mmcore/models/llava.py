"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"): the vision tower's tokens, projected by a
2-layer GELU MLP to the LM's width, stand in the sequence where the <image> token is."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcore.models.causal_lm import decoder_lm
from mmcore.models.decoder import Packing
from mmcore.models.fusion import FusionConfig, FusionModel
from mmcore.models.generate import splice_hidden
from mmcore.models.transformer import KVCache


@dataclass
class LlavaConfig(FusionConfig):
    """Vision tower + projector + LM: the projector's sizes follow from the two widths."""

    image_positions: bool = False
    """Add each patch token's row and column in the image (learned embeddings) to its projected token;
    initialised at std 0.2, about the projected tokens' own scale, so the LM sees where a patch is
    from the first steps (at 0.02 the relation questions gained less: experiments/fusion-binding)."""


class LlavaModel(FusionModel):
    family = "llava"

    def __init__(self, cfg: LlavaConfig, eos_id: int):
        super().__init__(cfg, eos_id)
        grid = cfg.vision.image_size // cfg.vision.patch_size
        self.image_tokens = 1 + grid ** 2  # CLS + patches
        self.extra_positions = self.image_tokens - 1
        width, needed = cfg.lm_width, cfg.lm.context_length + self.extra_positions
        self.projector = nn.Sequential(nn.Linear(cfg.vision.width, width), nn.GELU(), nn.Linear(width, width))
        self.lm = decoder_lm(cfg.lm, cfg.language, eos_id, needed, f"{self.image_tokens} image tokens and "
                             f"{cfg.lm.context_length} text tokens of a sample")
        if cfg.image_positions:
            self.patch_row = nn.Parameter(torch.randn(grid, 1, width) * 0.2)
            self.patch_column = nn.Parameter(torch.randn(1, grid, width) * 0.2)

    def context_of(self, features: torch.Tensor) -> torch.Tensor:
        """The tower's tokens (B, 1 + P, Dv) -> image tokens in the LM's width (B, 1 + P, D), with each
        patch's row and column when the config says."""
        tokens = self.projector(features)
        if not self.cfg.image_positions:
            return tokens
        grid = (self.patch_row + self.patch_column).flatten(0, 1)  # (P, D), row-major like the patches
        return torch.cat([tokens[:, :1], tokens[:, 1:] + grid], dim=1)

    def hidden(self, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
               caches: list[KVCache] | None = None, packing: Packing | None = None) -> torch.Tensor:
        return splice_hidden(self.lm, input_ids, context, start, caches, packing, self.image_id)
