"""What the fusion families share: the vision tower from a contrastive parent and a decoder LM;
generation and scoring come from models/generate.py.

A family (llava.py, flamingo.py) says how image information reaches the LM: `context_of(features)` makes
it from the tower's tokens, `hidden(input_ids, context, ...)` runs the LM with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmcore.models.causal_lm import CausalLMConfig
from mmcore.models.decoder import DecoderConfig
from mmcore.models.generate import IGNORE, TextGenerator
from mmcore.models.preprocess import PreprocessConfig
from mmcore.models.pretrained_clip import PretrainedClipConfig, PretrainedVisionTower
from mmcore.models.towers import VisionConfig, VisionTower


@dataclass
class FusionConfig:
    """What every fusion family has: the vision tower (the contrastive parent's, copied into the config
    at training time) and the language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: DecoderConfig = field(default_factory=DecoderConfig)
    vision_layer: int = -1
    """The tower's hidden state the LM sees, indexed as [embeddings, block 1, ..., block N]: -1 the
    last (after the final norm), -2 the one before it (LLaVA's choice), 0 the patch embeddings."""
    vision_hf: PretrainedClipConfig | None = None
    """An imported CLIP or SigLIP parent's config (its vision model is then the tower; `vision` gives its sizes)."""
    language: CausalLMConfig | None = None
    """The language parent's architecture, copied into the config at training time (model.lm_parent):
    the LM is then that transformers model (and `lm` gives only the text context_length)."""

    def validate(self) -> None:
        self.vision.validate()
        self.lm.validate()
        if self.language is not None:
            self.language.validate()
        if not -self.vision.layers - 1 <= self.vision_layer <= self.vision.layers:
            raise ValueError(f"vision_layer {self.vision_layer} is outside the tower's "
                             f"{self.vision.layers} layers (-{self.vision.layers + 1}..{self.vision.layers})")

    def set_vocab_size(self, vocab_size: int) -> None:
        self.lm.vocab_size = vocab_size
        if self.language is not None:  # an imported LM may have more rows than its tokenizer has tokens
            self.language.vocab_size = max(vocab_size, self.language.vocab_size)

    @property
    def lm_width(self) -> int:
        return self.language.width if self.language is not None else self.lm.width

    def preprocess(self) -> PreprocessConfig:
        """Images as the vision parent saw them (an imported one's normalisation), text in the LM's chat format
        (an imported LM's own template)."""
        images = {} if self.vision_hf is None else {"mean": tuple(self.vision_hf.mean),
                                                    "std": tuple(self.vision_hf.std)}
        chat = {} if self.language is None else {"chat_template": self.language.chat_template,
                                                 "chat_tokens": self.language.chat_tokens}
        return PreprocessConfig(image_size=self.vision.image_size, context_length=self.lm.context_length, **images,
                                **chat)


class FusionModel(TextGenerator):
    """Base of the fusion families: `visual` (the parent's VisionTower, or an imported one's vision model) built
    here, `lm` (a DecoderLM) built by the family, and per family `context_of(features)` and
    `hidden(input_ids, context, start, caches)`."""

    def __init__(self, cfg: FusionConfig, eos_id: int):
        super().__init__()
        cfg.validate()
        self.cfg, self.eos_id = cfg, eos_id
        self.visual = VisionTower(cfg.vision) if cfg.vision_hf is None else PretrainedVisionTower(cfg.vision_hf)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the tower's tokens (B, 1 + P, Dv); no graph when the tower is frozen."""
        trainable = any(p.requires_grad for p in self.visual.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.visual(images, self.cfg.vision_layer)

    def context(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> what the LM reads of the image (the family's `context_of` the tower's tokens)."""
        return self.context_of(self.image_features(images))

    def context_of(self, features: torch.Tensor) -> torch.Tensor:
        """The tower's tokens (B, 1 + P, Dv), computed here or read from a derived version -> the LM's context."""
        raise NotImplementedError


def loss_on_answers(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over labelled (answer) tokens only: logits (B, L, V), labels (B, L)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
