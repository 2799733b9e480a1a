"""A Task joins a model and a loss under one batch contract; one Task per training stage."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from mmcore.config import RunConfig
from mmcore.data.tokenizer import EOS
from mmcore.losses import LOSSES
from mmcore.models import build_model
from mmcore.models.preprocess import PreprocessConfig, normalize


class ContrastiveTask(nn.Module):
    """CLIP / SigLIP. Batch: {"image": (B, 3, H, W) uint8, "tokens": (B, L) int64}."""

    stage = "contrastive"

    def __init__(self, model: nn.Module, preprocess: PreprocessConfig, loss: str = "clip"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"task.loss: unknown loss {loss!r}; known: {sorted(LOSSES)}")
        self.model = model
        self.loss = LOSSES[loss]()
        # Not persistent: the preprocessing config is saved with the model, these are derived from it.
        self.register_buffer("mean", torch.tensor(preprocess.mean).reshape(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).reshape(3, 1, 1), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.image_proj.weight.dtype  # bf16 under DeepSpeed's bf16, else fp32
        images = normalize(batch["image"], self.mean.float(), self.std.float()).to(dtype)
        features = self.model(images, batch["tokens"])
        return self.loss(**{k: v.float() for k, v in features.items()})  # the loss in fp32 under bf16


TASKS = {"contrastive": ContrastiveTask}


def build_task(cfg: RunConfig, model_config: dict, tokenizer_json: str) -> tuple[nn.Module, PreprocessConfig]:
    """The stage's Task around a freshly initialised model sized for the dataset's tokenizer."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    model, preprocess = build_model(model_config, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))
    return TASKS[cfg.task.stage](model, preprocess, loss=cfg.task.loss), preprocess
