"""A Task joins a model and a loss under one batch contract; one Task per training stage.

The Task class is also the stage's factory for what surrounds the model: the tokenizer it trains
with (`tokenizer`) and the Ray Data preprocessing that makes its batches (`preprocessor`), so the
stream yields what the Task reads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from torch import nn

from mmcore.bundle import ModelBundle
from mmcore.config import RunConfig
from mmcore.data.instruct import SHARED
from mmcore.data.tokenizer import (CHAT_TOKENS, IMAGE, IMAGE_SPAN_TOKENS, PAD, SPECIAL_TOKENS, with_chat_tokens,
                                   with_tokens)
from mmcore.losses import LOSSES
from mmcore.models import architecture, build_model_for, image_code_names
from mmcore.models.decoder import Packing
from mmcore.models.fusion import loss_on_answers
from mmcore.models.generate import IGNORE
from mmcore.models.imagetok import psnr
from mmcore.models.preprocess import ImagePreprocessor, PreprocessConfig, Preprocessor, normalize
from mmcore.models.unified import unified_loss
from mmcore.stages import STAGES

Parents = dict[str, Path]
"""A stage's parents as local model bundle directories, by the config field that names them ("parent",
"lm_parent", "start_from"); the registry has already fetched them (train/parents.py): a Task never talks to it."""


class _Pixels(nn.Module):
    """uint8 images (B, 3, H, W) -> normalized, in the model's dtype (bf16 under DeepSpeed's bf16)."""

    def __init__(self, preprocess: PreprocessConfig):
        super().__init__()
        # Not persistent: the preprocessing config is saved with the model, these are derived from it.
        self.register_buffer("mean", torch.tensor(preprocess.mean).reshape(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).reshape(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return normalize(images, self.mean.float(), self.std.float()).to(dtype)


class ContrastiveTask(nn.Module):
    """CLIP / SigLIP. Batch: {"image": (B, 3, H, W) uint8, "tokens": (B, L) int64}."""

    def __init__(self, model: nn.Module, preprocess: PreprocessConfig, loss: str = "clip"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"task.loss: unknown loss {loss!r}; known: {sorted(LOSSES)}")
        self.model = model
        self.loss = LOSSES[loss]()
        self.pixels = _Pixels(preprocess)

    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, preprocess: PreprocessConfig,
              parents: Parents | None = None) -> "ContrastiveTask":
        """With a parent (model.parent: a contrastive model, trained or imported), fine-tuning: every weight
        starts from it, the loss's temperature from its own, and model.freeze_vision locks its image tower
        (LiT, Zhai et al. 2022: only the text side learns)."""
        task = cls(model, preprocess, loss=cfg.task.loss)
        if parents and "parent" in parents:
            model.load_state_dict(_load(parents["parent"]).state_dict())
            start = model.temperature() if hasattr(model, "temperature") else {}
            with torch.no_grad():
                for name, value in start.items():
                    if hasattr(task.loss, name):
                        getattr(task.loss, name).fill_(value)
            for part in model.image_tower():
                part.requires_grad_(not cfg.model.freeze_vision)  # frozen parameters stay out of the optimizer
        return task

    @staticmethod
    def tokenizer(dataset_tokenizer_json: str, arch: dict, parents: Parents | None = None) -> str:
        """A parent's tokenizer (it travels with its model), else the dataset's."""
        if parents and "parent" in parents:
            return ModelBundle.at(parents["parent"]).tokenizer_json()
        return dataset_tokenizer_json

    @staticmethod
    def preprocessor(cfg: RunConfig, preprocess: PreprocessConfig, tokenizer_json: str,
                     parents: Parents | None = None) -> Preprocessor:
        return Preprocessor(preprocess, tokenizer_json)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.model(self.pixels(batch["image"], self.model.dtype), batch["tokens"])
        return self.loss(**{k: v.float() for k, v in features.items()})  # the loss in fp32 under bf16


class _PixelTask(nn.Module):
    """A Task around one model whose batches carry uint8 images (normalized on the training device)."""

    def __init__(self, model: nn.Module, preprocess: PreprocessConfig):
        super().__init__()
        self.model = model
        self.pixels = _Pixels(preprocess)

    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, preprocess: PreprocessConfig,
              parents: Parents | None = None) -> nn.Module:
        return cls(model, preprocess)

    @staticmethod
    def tokenizer(dataset_tokenizer_json: str, arch: dict, parents: Parents | None = None) -> str:
        return dataset_tokenizer_json


class FusionTask(_PixelTask):
    """LLaVA / Flamingo on a parent's vision tower. Batch: {"image": (B, 3, H, W) uint8,
    "input_ids": (B, L), "labels": (B, L) (IGNORE outside answers), "truncated": (B,)}, and with
    `data.pack_length` "segments", "positions" (B, L) and "questions" (B,)."""


    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, preprocess: PreprocessConfig,
              parents: Parents | None = None) -> "FusionTask":
        """With `parents`, the vision tower (and the LM, with model.lm_parent) start from the parents'
        bundles, or the whole model from model.start_from's; without, freshly initialised (enough to size
        the preprocessing)."""
        if parents:
            model.visual.load_state_dict(_load(parents["parent"]).vision_state())
            if "lm_parent" in parents:  # a language model: its transformers weights
                model.lm.load_parent(_load(parents["lm_parent"]).lm)
            if "start_from" in parents:  # the same architecture: every weight (the parents' too)
                model.load_state_dict(_load(parents["start_from"]).state_dict())
                if cfg.model.lora.rank and not cfg.model.lora.merge \
                        and not model.lm.holds_parent(_load(parents["lm_parent"]).lm):
                    raise ValueError(f"model.lora.merge: the LM of model.start_from {cfg.model.start_from} is not its "
                                     f"language parent's {cfg.model.lm_parent} (it trained): adapters registered "
                                     "apart must adapt a registered LM; set model.lora.merge=true")
        model.visual.requires_grad_(not cfg.model.freeze_vision)  # frozen parameters stay out of the optimizer
        _train_lm(cfg, model)
        return cls(model, preprocess, question_loss=cfg.task.question_loss)

    def learning_rates(self, optim) -> dict[str, float]:
        """optim.bridge_lr for what joins the tower to the LM (every parameter outside both), by name."""
        if not optim.bridge_lr:
            return {}
        return {f"model.{name}": optim.bridge_lr for name, _ in self.model.named_parameters()
                if not name.startswith(("visual.", "lm."))}

    @staticmethod
    def tokenizer(dataset_tokenizer_json: str, arch: dict, parents: Parents | None = None) -> str:
        """The language parent's tokenizer (it travels with its model; with <image> added when an imported one
        lacks it), else the dataset's with the chat roles."""
        if parents and "lm_parent" in parents:
            return with_tokens(ModelBundle.at(parents["lm_parent"]).tokenizer_json(), [IMAGE])
        return with_chat_tokens(dataset_tokenizer_json)

    @staticmethod
    def preprocessor(cfg: RunConfig, preprocess: PreprocessConfig, tokenizer_json: str,
                     parents: Parents | None = None) -> Preprocessor:
        from mmcore.data.instruct import InstructPreprocessor

        pre = InstructPreprocessor(preprocess, tokenizer_json, seed=cfg.seed, pack_length=cfg.data.pack_length)
        return pre.reading("features") if FusionTask.reads_features(cfg, parents) else pre

    @staticmethod
    def reads_features(cfg: RunConfig, parents: Parents | None) -> bool:
        """Whether the stage reads its tower's tokens from a derived version (computed once) instead of running
        the tower on pixels: data.derived, the tower frozen, the images not augmented, and its weights the
        contrastive parent's (a model.start_from whose tower trained reads pixels)."""
        return bool(parents) and cfg.data.derived and cfg.model.freeze_vision and not cfg.data.augment and (
            "start_from" not in parents or _same_tower(parents["start_from"], parents["parent"]))

    @staticmethod
    def derivations(cfg: RunConfig, arch: dict, parents: Parents | None = None) -> list:
        """The contrastive parent's tower's tokens at the config's vision_layer, of every row (data/derived.py),
        when the stage `reads_features`: the frozen tower runs once per image, not once per step (data.derived)."""
        from mmcore.data.derived import Derivation

        if not FusionTask.reads_features(cfg, parents):
            return []
        layer = arch.get("vision_layer", -1) % (arch["vision"]["layers"] + 1)
        return [Derivation("image-features", cfg.model.parent, parents["parent"], (("layer", layer),))]

    def __init__(self, model: nn.Module, preprocess: PreprocessConfig, question_loss: float = 0.0):
        super().__init__(model, preprocess)
        self.question_loss = question_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.lm.head.weight.dtype
        if "image_features" in batch:  # a frozen tower's tokens, read from a derived version
            features = batch["image_features"]
            context = self.model.context_of(features.view(len(features), -1, self.model.cfg.vision.width).to(dtype))
        else:
            context = self.model.context(self.pixels(batch["image"], dtype))
        packing = Packing.of(batch)
        logits = self.model.head(self.model.hidden(batch["input_ids"], context, packing=packing))
        answers = loss_on_answers(logits, batch["labels"])
        out = {"loss": answers, "truncated_fraction": batch["truncated"].float().mean()}
        if self.question_loss:
            asked = loss_on_answers(logits, question_labels(batch["input_ids"], batch["labels"], batch.get("segments")))
            out |= {"loss": answers + self.question_loss * asked, "answer_loss": answers.detach(),
                    "question_loss": asked.detach()}
        return out | ({"questions_per_image": batch["questions"].float().mean()} if packing else {})


def _train_lm(cfg: RunConfig, model: nn.Module) -> None:
    """How the LM of a fusion or unified model trains, once its weights are loaded: frozen (model.freeze_lm),
    or with LoRA adapters (model.lora, starting at zero on top of the weights), or whole. Frozen or adapted, the
    rows of the tokens its language parent lacked still train."""
    model.lm.requires_grad_(not cfg.model.freeze_lm)
    lora = cfg.model.lora
    if lora.rank:
        model.lm.with_lora(lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    if cfg.model.freeze_lm or lora.rank:
        model.lm.train_new_rows()


@functools.lru_cache(maxsize=4)
def _same_tower(start_from: Path, parent: Path) -> bool:
    """Whether the fusion model at `start_from` holds the contrastive parent's image tower, weight for weight."""
    with safe_open(ModelBundle.at(start_from).weights, "pt") as weights:
        ours = {k.removeprefix("visual."): weights.get_tensor(k) for k in weights.keys() if k.startswith("visual.")}
    theirs = _load(parent).vision_state()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def question_labels(input_ids: torch.Tensor, labels: torch.Tensor,
                    segments: torch.Tensor | None = None) -> torch.Tensor:
    """The questions' tokens as next-token targets, IGNORE elsewhere: the tokens of each turn after the
    shared <bos> <|user|> <image> that are neither answer nor padding, each one that follows a token of
    its own turn (a turn's first word, after the image or another turn, is not asked for). `segments`:
    a packed batch's (0 on the shared prefix, k on turn k, -1 on padding); unpacked, one turn."""
    if segments is None:
        turn = (torch.arange(input_ids.shape[1], device=input_ids.device) >= SHARED).long()
        segments = torch.where(input_ids == SPECIAL_TOKENS.index(PAD), -1, turn.expand_as(input_ids))
    follows = torch.zeros_like(labels, dtype=torch.bool)
    follows[:, 1:] = segments[:, 1:] == segments[:, :-1]
    return torch.where((labels == IGNORE) & (segments > 0) & follows, input_ids, IGNORE)


class ImageTokenizerTask(_PixelTask):
    """The FSQ autoencoder learns to reconstruct. Batch: {"image": (B, 3, H, W) uint8}. Its tokenizer is
    the dataset's (unused by the model; the bundle keeps one like every stage's)."""


    @staticmethod
    def preprocessor(cfg: RunConfig, preprocess: PreprocessConfig, tokenizer_json: str,
                     parents: Parents | None = None) -> Preprocessor:
        return ImagePreprocessor(preprocess, tokenizer_json)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = self.pixels(batch["image"], self.model.decoder[0].weight.dtype)
        reconstruction, codes = self.model(images)
        error = (reconstruction.float() - images.float()) ** 2
        return {"loss": error.mean(), "psnr": psnr(error.detach() * self.pixels.std.float() ** 2),
                "codebook_usage": torch.tensor(codes.unique().numel() / self.model.codebook_size)}


class UnifiedTask(nn.Module):
    """One transformer over text and image codes. Batch: {"input_ids": (B, T), "labels": (B, T) (IGNORE
    where not counted), "truncated": (B,), "drawing": (B,)}, packed (data.pack_length) also "segments",
    "positions" (B, T) and "questions" (B,): the codes are made in the Ray Data step (data/mixed.py),
    so no pixels reach the trainers."""


    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, preprocess: PreprocessConfig,
              parents: Parents | None = None) -> "UnifiedTask":
        """With `parents`, the image tokenizer comes from the parent's bundle, and with model.lm_parent the
        transformer from the language parent (the rows of the span tokens and the codes, which it lacks, start
        at the mean of its rows)."""
        if parents:
            model.image_tokenizer.load_state_dict(_load(parents["parent"]).state_dict())
            if "lm_parent" in parents:
                model.lm.load_parent(_load(parents["lm_parent"]).lm)
        _train_lm(cfg, model)
        return cls(model)

    @staticmethod
    def tokenizer(dataset_tokenizer_json: str, arch: dict, parents: Parents | None = None) -> str:
        """The dataset's tokenizer with the chat roles (or the language parent's, with <image> when an imported
        one lacks it), then the image span tokens and the image tokenizer's codes (`arch`'s) as named special
        tokens, in that order after its own."""
        if parents and "lm_parent" in parents:
            text, chat = ModelBundle.at(parents["lm_parent"]).tokenizer_json(), [IMAGE]
        else:
            text, chat = dataset_tokenizer_json, CHAT_TOKENS
        return with_tokens(text, chat + IMAGE_SPAN_TOKENS + image_code_names(arch))

    @staticmethod
    def preprocessor(cfg: RunConfig, preprocess: PreprocessConfig, tokenizer_json: str,
                     parents: Parents | None = None) -> Preprocessor:
        """Reads the image tokenizer's codes from the datasets' derived versions (`derivations`), or, on augmented
        images, the tokenizer's weights (the parent's) travel with the preprocessing to the data workers, which
        make the codes."""
        from mmcore.data.mixed import MixedPreprocessor

        if not parents:
            raise ValueError("model.parent: the unified stage reads images as a registered image tokenizer's codes")
        files = ModelBundle.at(parents["parent"])
        config = architecture(json.loads(Path(files.config).read_text()))
        pre = MixedPreprocessor(preprocess, tokenizer_json, {"config": config, "state": load_file(files.weights)},
                                seed=cfg.seed, pack_length=cfg.data.pack_length, draw_fraction=cfg.data.draw_fraction)
        return pre.reading("codes") if UnifiedTask.derivations(cfg, {}, parents) else pre

    @staticmethod
    def derivations(cfg: RunConfig, arch: dict, parents: Parents | None = None) -> list:
        """What the stage reads from derived versions of its datasets (data/derived.py): the image tokenizer's
        codes of every row, computed once (on augmented images the data workers make them)."""
        from mmcore.data.derived import Derivation

        if not parents or cfg.data.augment or not cfg.data.derived:
            return []
        return [Derivation("image-codes", cfg.model.parent, parents["parent"])]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        packing = Packing.of(batch)
        out = unified_loss(self.model, self.model.logits(batch["input_ids"], packing), batch["labels"])
        out |= {"truncated_fraction": batch["truncated"].float().mean(),
                "drawing_fraction": batch["drawing"].float().mean()}
        reading = batch["drawing"] == 0
        if packing is not None and bool(reading.any()):
            out["questions_per_image"] = batch["questions"][reading].float().mean()
        return out


class LanguageTask(nn.Module):
    """A causal LM learns the text of a dataset (data/passages.py). Batch: {"input_ids": (B, L), "labels": (B, L)
    (the answers' tokens, IGNORE elsewhere), "text_labels": (B, L) (the rest's but padding), "truncated": (B,)}."""

    def __init__(self, model: nn.Module, text_loss: float = 1.0):
        super().__init__()
        self.model, self.text_loss = model, text_loss

    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, preprocess: PreprocessConfig,
              parents: Parents | None = None) -> "LanguageTask":
        return cls(model, cfg.task.text_loss)

    @staticmethod
    def tokenizer(dataset_tokenizer_json: str, arch: dict, parents: Parents | None = None) -> str:
        return with_chat_tokens(dataset_tokenizer_json)

    @staticmethod
    def preprocessor(cfg: RunConfig, preprocess: PreprocessConfig, tokenizer_json: str,
                     parents: Parents | None = None) -> Preprocessor:
        from mmcore.data.passages import TextPreprocessor

        return TextPreprocessor(preprocess, tokenizer_json)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["input_ids"])
        answers, text = _mean_nll(logits, batch["labels"]), _mean_nll(logits, batch["text_labels"])
        return {"loss": answers + self.text_loss * text, "answer_loss": answers.detach(), "text_loss": text.detach(),
                "truncated_fraction": batch["truncated"].float().mean()}


def _mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """loss_on_answers, zero (with a graph) when a batch labels no token of the kind (web captions: no answers)."""
    if bool((labels[:, 1:] != IGNORE).any()):
        return loss_on_answers(logits, labels)
    return logits.sum() * 0


def build_task(cfg: RunConfig, model_config: dict, tokenizer_json: str,
               parents: Parents | None = None) -> tuple[nn.Module, PreprocessConfig]:
    """The stage's Task around a model sized for `tokenizer_json` (the stage's tokenizer: its Task's
    `tokenizer` of the dataset's); with `parents`, parent weights are loaded from their local bundle
    directories, else the model is freshly initialised (enough to size the preprocessing)."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    model, preprocess = build_model_for(model_config, tokenizer)
    return STAGES[cfg.task.stage].task.build(cfg, model, preprocess, parents), preprocess


def _load(directory: Path) -> nn.Module:
    return ModelBundle.at(directory).load()[0]
