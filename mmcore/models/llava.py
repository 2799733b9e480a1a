"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"): the vision tower's tokens, projected by a
2-layer GELU MLP to the LM's width, stand in the sequence where the <image> token is."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcore.models.decoder import DecoderLM
from mmcore.models.fusion import FusionConfig, FusionModel
from mmcore.models.generate import splice_hidden
from mmcore.models.transformer import KVCache


@dataclass
class LlavaConfig(FusionConfig):
    """Vision tower + projector + LM: the projector's sizes follow from the two widths."""


class LlavaModel(FusionModel):
    family = "llava"

    def __init__(self, cfg: LlavaConfig, eos_id: int):
        super().__init__(cfg, eos_id)
        self.image_tokens = 1 + (cfg.vision.image_size // cfg.vision.patch_size) ** 2  # CLS + patches
        self.extra_positions = self.image_tokens - 1
        self.projector = nn.Sequential(nn.Linear(cfg.vision.width, cfg.lm.width), nn.GELU(),
                                       nn.Linear(cfg.lm.width, cfg.lm.width))
        self.lm = DecoderLM(cfg.lm, max_positions=cfg.lm.context_length + self.extra_positions)

    def context(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image tokens in the LM's width (B, 1 + P, D)."""
        return self.projector(self.image_features(images))

    def hidden(self, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        return splice_hidden(self.lm, input_ids, context, start, caches)
