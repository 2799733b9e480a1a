"""What the fusion families share: the vision tower from a contrastive parent, a decoder LM, and
generation (greedy or nucleus, with a KV cache) and scoring (log-likelihood) on top of them.

A family (llava.py, flamingo.py) says how image information reaches the LM: `context(images)`
makes it, `hidden(input_ids, context, ...)` runs the LM with it. Logits line up with input_ids:
logits[:, t] predicts input_ids[:, t + 1], whatever the family does with the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.data.tokenizer import IMAGE, SPECIAL_TOKENS
from mmcore.models.decoder import DecoderConfig, DecoderLM
from mmcore.models.preprocess import PreprocessConfig
from mmcore.models.towers import VisionConfig, VisionTower
from mmcore.models.transformer import KVCache

IMAGE_ID = SPECIAL_TOKENS.index(IMAGE)
IGNORE = -100
"""Label of a position the loss does not count (prompt, image, padding), as in torch's cross_entropy."""


@dataclass
class FusionConfig:
    """What every fusion family has: the vision tower (the contrastive parent's, copied into the config
    at training time) and the language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: DecoderConfig = field(default_factory=DecoderConfig)
    vision_layer: int = -1
    """The tower's hidden state the LM sees, indexed as [embeddings, block 1, ..., block N]: -1 the
    last (after the final norm), -2 the one before it (LLaVA's choice), 0 the patch embeddings."""

    def validate(self) -> None:
        self.vision.validate()
        self.lm.validate()
        if not -self.vision.layers - 1 <= self.vision_layer <= self.vision.layers:
            raise ValueError(f"vision_layer {self.vision_layer} is outside the tower's "
                             f"{self.vision.layers} layers (-{self.vision.layers + 1}..{self.vision.layers})")

    def set_vocab_size(self, vocab_size: int) -> None:
        self.lm.vocab_size = vocab_size

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.vision.image_size, context_length=self.lm.context_length)


class FusionModel(nn.Module):
    """Base of the fusion families: `visual` (the parent's VisionTower) built here, `lm` (a DecoderLM)
    built by the family, and per family `context(images)` and `hidden(input_ids, context, start, caches)`."""

    lm: DecoderLM
    extra_positions = 0
    """LM positions a sample takes beyond its text tokens (LLaVA: the image tokens minus <image>)."""

    def __init__(self, cfg: FusionConfig, eos_id: int):
        super().__init__()
        cfg.validate()
        self.cfg, self.eos_id = cfg, eos_id
        self.visual = VisionTower(cfg.vision)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the tower's tokens (B, 1 + P, Dv); no graph when the tower is frozen."""
        trainable = any(p.requires_grad for p in self.visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.visual(images, self.cfg.vision_layer)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, L) -> logits (B, L, V)."""
        return self.lm.head(self.hidden(input_ids, self.context(images)))

    @torch.no_grad()
    def score(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of log p(token) over the labelled tokens of each row: (B,) (the answer's log-likelihood)."""
        logits = self(images, input_ids)[:, :-1].float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (targets != IGNORE)).sum(1)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each prompt (B, L; all rows the same length, no padding) -> new ids (B, T), T <= max_new_tokens.

        Greedy when temperature is 0, else nucleus sampling (top_p). A row that produced <eos> is
        padded with <eos> until every row has. Without the cache every step reruns the whole
        sequence: the same tokens, slower (a test holds them equal).
        """
        limit = self.lm.pos.shape[1] - self.extra_positions - prompt_ids.shape[1]
        if limit < 1:
            raise ValueError(f"prompt of {prompt_ids.shape[1]} tokens leaves no room in the context of "
                             f"{self.lm.pos.shape[1] - self.extra_positions}")
        context = self.context(images)
        caches = self.lm.new_caches() if use_cache else None
        last = self.hidden(prompt_ids, context, caches=caches)[:, -1]
        ids, done = prompt_ids, torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
        for _ in range(min(max_new_tokens, limit)):
            token = self._pick(self.lm.head(last).float(), temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, self.eos_id), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == self.eos_id
            if done.all():
                break
            if caches is not None:
                start = ids.shape[1] - 1 + self.extra_positions
                last = self.hidden(token[:, None], context, start=start, caches=caches)[:, -1]
            else:
                last = self.hidden(ids, context)[:, -1]
        return ids[:, prompt_ids.shape[1]:]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set reaching top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)

    # ----- per family -----
    def context(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, input_ids: torch.Tensor, context: torch.Tensor, start: int = 0,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        raise NotImplementedError


def loss_on_answers(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled (answer) tokens only: logits (B, L, V), labels (B, L)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
