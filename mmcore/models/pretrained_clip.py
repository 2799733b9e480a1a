"""A CLIP or SigLIP from transformers (CLIPModel, SiglipModel) behind the contrastive model's interface: what a
Hugging Face checkpoint imported into the contrastive stage becomes (`mmpipe models import --stage contrastive`),
evaluated, gated and fine-tuned like a CLIP mmpipe trained (LiT: model.freeze_vision).

On disk it is a Hugging Face directory (config.json, model.safetensors, the tokenizer) beside mmpipe's
model.json and preprocess.json. transformers is imported when a model is built or loaded, not with this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmcore.models.preprocess import PreprocessConfig

ARCHITECTURES = ("clip", "siglip")
"""The transformers model_types the contrastive stage imports."""
NORMALISATION = {"clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
                 "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}
"""Each architecture's image mean and std, for a checkpoint without an image processor's file
(preprocessor_config.json)."""


@dataclass
class PretrainedClipConfig:
    """A transformers CLIP or SigLIP: its config as transformers writes it, and what the preprocessing needs."""

    architecture: str = "clip"
    """The transformers model_type: clip or siglip."""
    image_size: int = 224
    context_length: int = 77
    """Text tokens per caption: the text model's positions."""
    embed_dim: int = 512
    """Size of the shared embedding."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    tokens: dict = field(default_factory=dict)
    """The tokenizer's special tokens by role (bos_token, eos_token, pad_token, unk_token), to save it again."""
    hf: dict = field(default_factory=dict)
    """The transformers config (config.json's fields)."""
    vocab_size: int = 0
    """The stage tokenizer's size when built (the embedding table is the checkpoint's)."""

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")

    def set_vocab_size(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, context_length=self.context_length,
                                mean=tuple(self.mean), std=tuple(self.std))

    @classmethod
    def of(cls, config, tokenizer, mean, std) -> "PretrainedClipConfig":
        """The config of an imported checkpoint: its transformers `config` and `tokenizer`, the images' `mean`
        and `std` (its image processor's)."""
        tokens = {role: getattr(tokenizer, role) for role in ("bos_token", "eos_token", "pad_token", "unk_token")
                  if getattr(tokenizer, role, None)}
        hf = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "architectures",
                                                                     "model_type")}
        embed_dim = config.projection_dim if config.model_type == "clip" else config.text_config.hidden_size
        return cls(architecture=config.model_type, image_size=int(config.vision_config.image_size),
                   context_length=int(config.text_config.max_position_embeddings), embed_dim=int(embed_dim),
                   mean=list(mean), std=list(std),
                   tokens=tokens, hf=hf, vocab_size=len(tokenizer))


class PretrainedClip(nn.Module):
    """Unit-norm image and text embeddings from a transformers CLIP or SigLIP (`hf`); as with the CLIP mmpipe
    trains, the temperature lives in the loss (tasks.ContrastiveTask starts it at the checkpoint's)."""

    family = "hf-clip"

    def __init__(self, cfg: PretrainedClipConfig, eos_id: int | None = None, hf: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.hf = hf if hf is not None else _from_config(cfg)
        # The loss's own copies train (tasks.ContrastiveTask); the checkpoint's stay as 0-dim buffers (DeepSpeed
        # cannot broadcast a 0-dim parameter), under the same names in the saved weights.
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(self.hf, name, None), nn.Parameter):
                value = getattr(self.hf, name).detach()
                delattr(self.hf, name)
                self.hf.register_buffer(name, value)

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.text_model.embeddings.token_embedding.weight.dtype

    def vision_state(self) -> dict[str, torch.Tensor]:
        """The image tower a fusion model takes (PretrainedVisionTower's weights)."""
        return {f"vision_model.{k}": v for k, v in self.hf.vision_model.state_dict().items()}

    def vision_tower(self) -> nn.Module:
        """The image tower as a fusion model holds it (PretrainedVisionTower, these weights)."""
        tower = PretrainedVisionTower(self.cfg)
        tower.load_state_dict(self.vision_state())
        return tower.eval()

    def image_tower(self) -> list[nn.Module]:
        """What LiT locks: the vision model and its projection."""
        return [self.hf.vision_model, *([self.hf.visual_projection] if hasattr(self.hf, "visual_projection") else [])]

    def temperature(self) -> dict[str, float]:
        """The checkpoint's logit scale (log of the inverse temperature) and, for SigLIP, its bias."""
        return {name: float(getattr(self.hf, name)) for name in ("logit_scale", "logit_bias") if hasattr(self.hf, name)}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E), unit norm."""
        return F.normalize(self.hf.get_image_features(pixel_values=images).pooler_output, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, padded to the context as the checkpoint was trained -> (B, E), unit norm."""
        return F.normalize(self.hf.get_text_features(input_ids=tokens).pooler_output, dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(tokens)}

    def save_pretrained(self, directory: Path, tokenizer_json: str) -> None:
        """The Hugging Face directory: weights in fp32 safetensors, config, and the tokenizer (`tokenizer_json`
        as the preprocessing reads it, with its padding)."""
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        from mmcore.models.causal_lm import save_fp32

        save_fp32(self.hf, directory)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json),
                                            model_max_length=self.cfg.context_length, **self.cfg.tokens)
        tokenizer.save_pretrained(directory)
        (Path(directory) / "tokenizer.json").write_text(tokenizer_json)

    @classmethod
    def from_pretrained(cls, directory: Path, cfg: PretrainedClipConfig) -> "PretrainedClip":
        from transformers import AutoModel

        from mmcore.models.causal_lm import quiet

        quiet()
        hf = AutoModel.from_pretrained(directory, dtype=torch.float32)
        if hf.config.model_type not in ARCHITECTURES:
            raise ValueError(f"{directory}: a {hf.config.model_type} model, not a CLIP or SigLIP")
        return cls(cfg, hf=hf)


class PretrainedVisionTower(nn.Module):
    """An imported CLIP's or SigLIP's vision model behind the VisionTower interface a fusion model reads:
    images (B, 3, H, W) -> tokens (B, 1 + P, D), a global token first (CLIP's CLS; SigLIP, which has none,
    its attention-pooled output), then the patches. Its weights come from the contrastive parent
    (tasks.FusionTask)."""

    def __init__(self, cfg: PretrainedClipConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from mmcore.models.causal_lm import quiet

        quiet()
        vision = AutoConfig.for_model(cfg.architecture, **cfg.hf).vision_config
        self.cfg, self.layers = cfg, vision.num_hidden_layers
        self.vision_model = AutoModel.from_config(vision, dtype=torch.float32)  # what CLIPModel.vision_model is

    def forward(self, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """`layer` as VisionTower's: -1 the last hidden state (after SigLIP's final norm), -2 the one before."""
        index = layer % (self.layers + 1)
        out = self.vision_model(pixel_values=images, output_hidden_states=index != self.layers)
        tokens = out.last_hidden_state if index == self.layers else out.hidden_states[index]
        if self.cfg.architecture == "siglip":
            tokens = torch.cat([out.pooler_output[:, None], tokens], dim=1)
        return tokens


def vision_config(hf: dict) -> dict:
    """The VisionConfig fields (sizes) of a transformers CLIP's or SigLIP's vision model, from its config."""
    vision = hf["vision_config"]
    return {"image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"], "heads": vision["num_attention_heads"],
            "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]}


def _from_config(cfg: PretrainedClipConfig) -> nn.Module:
    """Freshly initialised (the weights come from a parent's bundle: tasks.ContrastiveTask)."""
    from transformers import AutoConfig, AutoModel

    from mmcore.models.causal_lm import quiet

    quiet()
    return AutoModel.from_config(AutoConfig.for_model(cfg.architecture, **cfg.hf), dtype=torch.float32)


def card(cfg: PretrainedClipConfig) -> dict:
    """The model.json of an imported CLIP or SigLIP."""
    return {"family": PretrainedClip.family, **asdict(cfg)}
