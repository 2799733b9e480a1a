"""The image tokenizer: a small convolutional autoencoder whose latent grid is quantised by FSQ
(Mentzer et al. 2023, "Finite Scalar Quantization"; the quantiser is vector-quantize-pytorch's).

An image becomes (image_size / 2^len(channels))^2 codes in [0, codebook_size), row-major; the unified
stage reads them as tokens and turns generated codes back into pixels with `decode`. FSQ has no
codebook to collapse and no commitment loss: the training objective is reconstruction alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from vector_quantize_pytorch import FSQ

from mmcore.models.preprocess import PreprocessConfig


@dataclass
class ImageTokenizerConfig:
    image_size: int = 64
    """Side of the images it encodes, in pixels."""
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Conv widths, one per resolution; each halves the side, so 3 entries turn 64 pixels into 8 codes."""
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    """FSQ levels per latent channel; the codebook has their product of codes (8*5*5*5 = 1000)."""

    def validate(self) -> None:
        if not self.channels or any(c < 8 or c % 8 for c in self.channels):
            raise ValueError(f"channels {self.channels}: each must be a positive multiple of 8 (GroupNorm of 8)")
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channels)} "
                             f"(one halving per entry of channels)")
        if not self.levels or any(level < 3 for level in self.levels):
            raise ValueError(f"levels {self.levels}: each must be >= 3")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def set_vocab_size(self, vocab_size: int) -> None:
        """An image tokenizer reads no text."""

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, context_length=0)


def psnr(squared_error: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB over a batch, from squared errors (B, ...) of pixels in [0, 1]."""
    mse = squared_error.flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean()


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                   nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ImageTokenizer(nn.Module):
    """encode: (B, 3, S, S) normalized pixels -> (B, N) codes; decode: codes -> pixels (normalized)."""

    family = "vq"

    def __init__(self, cfg: ImageTokenizerConfig, eos_id: int | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths, dim = cfg.channels, len(cfg.levels)
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for width, wider in zip(widths, widths[1:] + widths[-1:]):
            layers += [_Residual(width), nn.Conv2d(width, wider, 4, stride=2, padding=1)]
        layers += [_Residual(widths[-1]), nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], dim, 1)]
        self.encoder = nn.Sequential(*layers)
        self.quantizer = FSQ(cfg.levels)
        layers = [nn.Conv2d(dim, widths[-1], 3, padding=1), _Residual(widths[-1])]
        backwards = widths[::-1]
        for width, narrower in zip(backwards, backwards[1:] + backwards[-1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, narrower, 3, padding=1),
                       _Residual(narrower)]
        layers += [nn.GroupNorm(8, widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    @property
    def grid(self) -> int:
        """Codes per side of an image."""
        return self.cfg.image_size // 2 ** len(self.cfg.channels)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized -> (B, grid * grid) int64 codes, row-major."""
        _, codes = self.quantizer(self.encoder(images))
        return codes.flatten(1).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, grid * grid) codes -> (B, 3, S, S) normalized pixels (clamped to the normalized range)."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got {int(codes.min())}..{int(codes.max())}")
        grid = codes.reshape(codes.shape[0], self.grid, self.grid)
        latent = self.quantizer.indices_to_codes(grid.int()).to(self.decoder[0].weight.dtype)
        return self.decoder(latent).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (reconstruction (B, 3, S, S), codes (B, grid * grid)); gradients pass the quantiser
        straight through."""
        latent, codes = self.quantizer(self.encoder(images))
        return self.decoder(latent), codes.flatten(1).long()
