"""A Task joins a model and a loss under one batch contract; one Task per training stage."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from mmcore.config import RunConfig
from mmcore.data.tokenizer import EOS
from mmcore.losses import LOSSES
from mmcore.models import build_model
from mmcore.models.preprocess import PreprocessConfig


class ContrastiveTask(nn.Module):
    """CLIP / SigLIP. Batch: {"image": (B, 3, H, W) float, "tokens": (B, L) int64}."""

    stage = "contrastive"

    def __init__(self, model: nn.Module, loss: str = "clip"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"task.loss: unknown loss {loss!r}; known: {sorted(LOSSES)}")
        self.model = model
        self.loss = LOSSES[loss]()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.model(batch["image"], batch["tokens"])
        return self.loss(**{k: v.float() for k, v in features.items()})  # the loss in fp32 under bf16


TASKS = {"contrastive": ContrastiveTask}


def build_task(cfg: RunConfig, model_config: dict, tokenizer_json: str) -> tuple[nn.Module, PreprocessConfig]:
    """The stage's Task around a freshly initialised model sized for the dataset's tokenizer."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    model, preprocess = build_model(model_config, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
    return TASKS[cfg.task.stage](model, loss=cfg.task.loss), preprocess
