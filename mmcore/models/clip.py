"""The two-tower contrastive model (CLIP / SigLIP share it; the loss differs, see losses.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.models.preprocess import PreprocessConfig
from mmcore.models.towers import TextConfig, TextTower, VisionConfig, VisionTower


@dataclass
class ClipConfig:
    """Two towers projected into one embedding space (Radford et al. 2021)."""

    embed_dim: int = 128
    """Size of the shared embedding."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()

    def set_vocab_size(self, vocab_size: int) -> None:
        self.text.vocab_size = vocab_size

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.vision.image_size, context_length=self.text.context_length)


class ClipModel(nn.Module):
    """Returns unit-norm image and text embeddings; the temperature lives in the loss."""

    family = "clip"

    def __init__(self, cfg: ClipConfig, eos_id: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text, eos_id)
        self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.weight.dtype

    def vision_state(self) -> dict[str, torch.Tensor]:
        """The image tower a fusion model takes (VisionTower's weights)."""
        return self.visual.state_dict()

    def vision_tower(self) -> nn.Module:
        """The image tower as a fusion model holds it: images (B, 3, H, W), layer -> tokens (B, 1 + P, D)."""
        return self.visual

    def image_tower(self) -> list[nn.Module]:
        """What LiT locks (model.freeze_vision): the image tower and its projection."""
        return [self.visual, self.image_proj]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E), unit norm."""
        return F.normalize(self.image_proj(self.visual(images)[:, 0]), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, E), unit norm."""
        return F.normalize(self.text_proj(self.text(tokens)[1]), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(tokens)}
