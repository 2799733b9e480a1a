"""Losses own the objective and its collectives: features in, dict out.

ClipLoss: symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), computed the open_clip way under data parallelism: each rank
scores its own rows against every rank's features (gathered with gradients), so the mean of
the ranks' losses is the full-batch loss and its gradient is exact.
SigLipLoss: pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training"), with a learnable temperature and bias, gathered the same way.
Scalars are shape-[1] parameters: DeepSpeed fails on 0-dim parameters with several ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Gather = Callable[[torch.Tensor], torch.Tensor]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (R*B, ...), in rank order; gradients flow back to each rank's own rows."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():  # deprecated for a private successor; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_fn.all_gather(x), dim=0)


def this_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over cosine similarities scaled by a learned temperature."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0,
                 gather: Gather = gather_with_grad, rank: Callable[[], int] = this_rank):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / init_temperature)))
        self.max_scale, self.gather, self.rank = max_scale, gather, rank

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.logit_scale.exp().clamp(max=self.max_scale)
        all_images, all_texts = self.gather(image_features), self.gather(text_features)
        logits_per_image = scale * image_features @ all_texts.T  # (B, R*B)
        logits_per_text = scale * text_features @ all_images.T  # (B, R*B)
        labels = torch.arange(image_features.shape[0], device=image_features.device)
        labels = labels + self.rank() * image_features.shape[0]
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"loss": loss, "logit_scale": scale.detach().squeeze()}


class SigLipLoss(nn.Module):
    """-mean over images of sum over texts of log sigmoid(z * (t * x.y + b)), z = +1 on pairs, -1 elsewhere."""

    def __init__(self, init_temperature: float = 0.1, init_bias: float = -10.0,
                 gather: Gather = gather_with_grad, rank: Callable[[], int] = this_rank):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.full([1], init_bias))
        self.gather, self.rank = gather, rank

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = image_features.shape[0]
        all_texts = self.gather(text_features)
        logits = self.logit_scale.exp() * image_features @ all_texts.T + self.logit_bias  # (B, R*B)
        signs = -torch.ones_like(logits)
        offset = self.rank() * batch
        signs[torch.arange(batch), torch.arange(batch) + offset] = 1.0
        loss = -F.logsigmoid(signs * logits).sum() / batch
        return {"loss": loss, "logit_scale": self.logit_scale.exp().detach().squeeze(),
                "logit_bias": self.logit_bias.detach().squeeze()}


LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}
