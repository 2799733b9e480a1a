"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"): the vision tower's tokens, projected by a
2-layer GELU MLP to the LM's width, stand in the sequence where the <image> token is."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcore.models.decoder import DecoderLM
from mmcore.models.fusion import IMAGE_ID, FusionConfig, FusionModel
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
        """Text (B, L) -> LM states at the text positions (B, L, D); the <image> position gets the state
        of the last image token, which predicts the token after <image>. Continuing after a prefill
        (start > 0), the ids are text only and follow the image."""
        text = self.lm.embed(input_ids)  # (B, L, D)
        if start:
            return self.lm(text, start=start, caches=caches)
        at = self._image_position(input_ids)  # (B,)
        b, length = input_ids.shape
        n = context.shape[1]
        j = torch.arange(length + n - 1, device=input_ids.device)[None]  # positions of the spliced sequence
        in_image = (j >= at[:, None]) & (j < at[:, None] + n)  # (B, L + N - 1)
        text_index = torch.where(j < at[:, None], j, j - n + 1).clamp(0, length - 1)
        image_index = (j - at[:, None]).clamp(0, n - 1)
        spliced = torch.where(in_image[..., None], _take(context, image_index), _take(text, text_index))
        states = self.lm(spliced, caches=caches)  # (B, L + N - 1, D)
        t = torch.arange(length, device=input_ids.device)[None]
        return _take(states, torch.where(t < at[:, None], t, t + n - 1))

    @staticmethod
    def _image_position(input_ids: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == IMAGE_ID
        counts = is_image.sum(1)
        if not bool((counts == 1).all()):
            row = int((counts != 1).nonzero()[0])
            raise ValueError(f"row {row}: a LLaVA prompt needs exactly one <image> token, it has {int(counts[row])}")
        return is_image.int().argmax(1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) at index (B, M) -> (B, M, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
