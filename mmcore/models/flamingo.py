"""Flamingo (Alayrac et al. 2022): a Perceiver resampler turns the tower's tokens into a few latents;
gated cross-attention blocks before every k-th LM layer let the text attend to them. The tanh gates
start at zero, so an untrained Flamingo is exactly its LM without the image (open_flamingo's
helpers.py is the reference layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmcore.models.causal_lm import decoder_lm
from mmcore.models.decoder import Packing
from mmcore.models.fusion import FusionConfig, FusionModel
from mmcore.models.transformer import CrossAttention, KVCache, mlp


@dataclass
class FlamingoConfig(FusionConfig):
    """Vision tower + resampler + gated cross-attention + LM."""

    latents: int = 16
    """Learned queries of the resampler: the image reaches the LM as this many tokens."""
    resampler_layers: int = 2
    cross_every: int = 1
    """A gated cross-attention block before LM layers 0, k, 2k, ..."""
    gate_scale: float = 1.0
    """The gates are tanh(gate_scale * a). Adam moves `a` by about the learning rate a step whatever
    its gradient's size, so the gates move about gate_scale times faster (though their gradients,
    gate_scale times larger, also weigh that much more in the global-norm clipping). An LM trained
    from scratch next to zero gates learns the text alone first; at 1 the gates of `flamingo-demo`
    once stayed shut for a whole run (experiments/flamingo-gates)."""

    def validate(self) -> None:
        super().validate()
        if self.latents < 1 or self.resampler_layers < 1 or self.cross_every < 1:
            raise ValueError("flamingo: latents, resampler_layers and cross_every must be at least 1")
        if self.gate_scale <= 0:
            raise ValueError(f"flamingo: gate_scale must be > 0, got {self.gate_scale}")


class PerceiverResampler(nn.Module):
    """(B, N, D) media tokens -> (B, latents, D): latents attend to [media; latents], then an MLP."""

    def __init__(self, width: int, heads: int, latents: int, layers: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, latents, width) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "ln_media": nn.LayerNorm(width), "ln_latents": nn.LayerNorm(width),
            "attn": CrossAttention(width, heads), "ln_mlp": nn.LayerNorm(width), "mlp": mlp(width)})
            for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        x = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer["ln_latents"](x)
            x = x + layer["attn"](latents, torch.cat([layer["ln_media"](media), latents], dim=1))
            x = x + layer["mlp"](layer["ln_mlp"](x))
        return self.ln_out(x)


class GatedCrossAttention(nn.Module):
    """x + tanh(s * a) * xattn(ln(x), latents); x + tanh(s * b) * mlp(ln(x)); a = b = 0 at initialisation."""

    def __init__(self, width: int, heads: int, scale: float):
        super().__init__()
        self.scale = scale
        self.ln_attn = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # shape [1]: DeepSpeed fails on 0-dim parameters
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = mlp(width)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.scale * self.attn_gate) * self.attn(self.ln_attn(x), latents)
        return x + torch.tanh(self.scale * self.mlp_gate) * self.mlp(self.ln_mlp(x))


class FlamingoModel(FusionModel):
    family = "flamingo"

    def __init__(self, cfg: FlamingoConfig, eos_id: int):
        super().__init__(cfg, eos_id)
        lm = cfg.language or cfg.lm  # a language parent's LM (its layers wrapped, as open_flamingo does), or ours
        self.media_proj = nn.Linear(cfg.vision.width, lm.width)
        self.resampler = PerceiverResampler(lm.width, lm.heads, cfg.latents, cfg.resampler_layers)
        self.cross = nn.ModuleList(GatedCrossAttention(lm.width, lm.heads, cfg.gate_scale)
                                   for _ in range(0, lm.layers, cfg.cross_every))
        self.lm = decoder_lm(cfg.lm, cfg.language, eos_id, cfg.lm.context_length,
                             f"{cfg.lm.context_length} text tokens of a sample")

    def context_of(self, features: torch.Tensor) -> torch.Tensor:
        """The tower's tokens (B, 1 + P, Dv) -> resampled latents (B, latents, D)."""
        return self.resampler(self.media_proj(features))

    def hidden(self, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
               caches: list[KVCache] | None = None, packing: Packing | None = None) -> torch.Tensor:
        """Every text position attends to the image's latents (one image per sample, first in the prompt)."""
        def between(i: int, x: torch.Tensor) -> torch.Tensor:
            return self.cross[i // self.cfg.cross_every](x, context) if i % self.cfg.cross_every == 0 else x

        return self.lm(self.lm.embed(input_ids), start=start, caches=caches, between=between, packing=packing)
