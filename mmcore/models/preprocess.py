"""Preprocessing that matches a model: decode, resize, normalize images; tokenize and pad captions."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from mmcore.data.tokenizer import PAD


@dataclass
class PreprocessConfig:
    """What a model expects; built by the same factory as the model (models.build_model)."""

    image_size: int
    context_length: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    train_crop_scale: float = 0.9
    """Training images are randomly cropped to a square of this fraction of the side (or more), then
    resized. No flips: captions say "left of" and "right of"."""
    chat_template: str = ""
    """A fusion model's chat format when its LM brought its own (an imported LM's Jinja template); empty:
    mmpipe's `<bos> <|user|> <image> question <|assistant|> answer <eos>` (data/instruct.py)."""
    chat_tokens: dict = field(default_factory=dict)
    """The template's special tokens by role (bos_token, eos_token, pad_token): eos_token ends an answer."""


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32, (x / 255 - mean) / std; mean and std shaped (3, 1, 1)."""
    return (pixels.float() / 255.0 - mean) / std


class Preprocessor:
    """Turns {"image": encoded bytes, "caption": str} batches into model inputs (numpy).

    For training (`__call__`, run by Ray Data in `map_batches`) images stay uint8: a quarter of
    float32's bytes in the object store and between processes; the Task normalizes them on the
    training device. `images()` returns them normalized, for inference and evaluation.
    Picklable (the tokenizer travels as its JSON).
    """

    columns = ["image", "caption"]
    """The shard columns the training stream reads for it (those a shard lacks are left out)."""

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, augment: bool = False):
        self.cfg = cfg
        self.tokenizer_json = tokenizer_json
        self.augment = augment
        self._rng = np.random.default_rng()
        self._tokenizer: Tokenizer | None = None
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).reshape(3, 1, 1)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tokenizer = Tokenizer.from_str(self.tokenizer_json)
            # An imported model's tokenizer names its own padding (hub.py); the dataset's pads with <pad>.
            pad = tokenizer.padding or {"pad_id": tokenizer.token_to_id(PAD), "pad_token": PAD}
            tokenizer.enable_truncation(self.cfg.context_length)
            tokenizer.enable_padding(length=self.cfg.context_length, pad_id=pad["pad_id"], pad_token=pad["pad_token"])
            self._tokenizer = tokenizer
        return self._tokenizer

    def for_split(self, split: str, augment: bool) -> "Preprocessor":
        """The same preprocessing, with augmentation (if asked for) on the train split only."""
        clone = copy.copy(self)
        clone.augment, clone._rng = augment and split == "train", np.random.default_rng()
        return clone

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None, "_rng": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rng = np.random.default_rng()  # a fresh stream in every Ray Data worker

    def image(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> (3, S, S) float32, normalized."""
        return self.images([data])[0]

    def pixels(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> (3, S, S) uint8: decoded, cropped when augmenting, resized."""
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if self.augment:
                image = self._random_crop(image)
            if image.size != (self.cfg.image_size, self.cfg.image_size):
                image = image.resize((self.cfg.image_size, self.cfg.image_size), Image.BICUBIC)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)

    def _random_crop(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        crop = int(side * self._rng.uniform(self.cfg.train_crop_scale, 1.0))
        left = int(self._rng.integers(0, image.size[0] - crop + 1))
        top = int(self._rng.integers(0, image.size[1] - crop + 1))
        return image.crop((left, top, left + crop, top + crop))

    def batch_pixels(self, blobs) -> np.ndarray:
        """Encoded images -> (B, 3, S, S) uint8."""
        return np.stack([self.pixels(bytes(b)) for b in blobs]) if len(blobs) else \
            np.zeros((0, 3, self.cfg.image_size, self.cfg.image_size), np.uint8)

    def images(self, blobs) -> np.ndarray:
        """Encoded images -> (B, 3, S, S) float32, normalized (inference and evaluation)."""
        return normalize(torch.from_numpy(self.batch_pixels(blobs)), self.mean, self.std).numpy()

    def to_uint8(self, pixels: torch.Tensor) -> np.ndarray:
        """Normalized (B, 3, S, S) -> (B, S, S, 3) uint8, as a PNG of it would hold (normalize's inverse)."""
        unit = pixels.float() * self.std + self.mean
        return (unit.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()

    def tokens(self, captions) -> np.ndarray:
        """Captions -> (B, context_length) int64 ids: <bos> ... <eos> <pad>..."""
        encodings = self.tokenizer.encode_batch([str(c) for c in captions])
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(captions), self.cfg.context_length)

    def __call__(self, batch: dict) -> dict:
        """The training batch: uint8 pixels (normalized by the Task, on its device) and token ids."""
        return {"image": self.batch_pixels(batch["image"]), "tokens": self.tokens(batch["caption"])}


class ImagePreprocessor(Preprocessor):
    """Images only (the image tokenizer's batches): the same decoding, no captions read."""

    columns = ["image"]

    def __call__(self, batch: dict) -> dict:
        return {"image": self.batch_pixels(batch["image"])}
