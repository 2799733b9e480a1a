"""Preprocessing that matches a model: decode, resize, normalize images; tokenize and pad captions."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
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


class Preprocessor:
    """Turns {"image": encoded bytes, "caption": str} batches into model inputs (numpy).

    Picklable (the tokenizer travels as its JSON) so Ray Data can run it in `map_batches`.
    """

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, augment: bool = False):
        self.cfg = cfg
        self.tokenizer_json = tokenizer_json
        self.augment = augment
        self._rng = np.random.default_rng()
        self._tokenizer: Tokenizer | None = None
        self.mean = np.array(cfg.mean, np.float32).reshape(3, 1, 1)
        self.std = np.array(cfg.std, np.float32).reshape(3, 1, 1)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tokenizer = Tokenizer.from_str(self.tokenizer_json)
            tokenizer.enable_truncation(self.cfg.context_length)
            tokenizer.enable_padding(length=self.cfg.context_length, pad_id=tokenizer.token_to_id(PAD),
                                     pad_token=PAD)
            self._tokenizer = tokenizer
        return self._tokenizer

    def for_split(self, split: str, augment: bool) -> "Preprocessor":
        """The same preprocessing, with augmentation (if asked for) on the train split only."""
        return Preprocessor(self.cfg, self.tokenizer_json, augment=augment and split == "train")

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None, "_rng": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rng = np.random.default_rng()  # a fresh stream in every Ray Data worker

    def image(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> (3, S, S) float32, normalized."""
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if self.augment:
                image = self._random_crop(image)
            if image.size != (self.cfg.image_size, self.cfg.image_size):
                image = image.resize((self.cfg.image_size, self.cfg.image_size), Image.BICUBIC)
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std

    def _random_crop(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        crop = int(side * self._rng.uniform(self.cfg.train_crop_scale, 1.0))
        left = int(self._rng.integers(0, image.size[0] - crop + 1))
        top = int(self._rng.integers(0, image.size[1] - crop + 1))
        return image.crop((left, top, left + crop, top + crop))

    def images(self, blobs) -> np.ndarray:
        return np.stack([self.image(bytes(b)) for b in blobs]) if len(blobs) else \
            np.zeros((0, 3, self.cfg.image_size, self.cfg.image_size), np.float32)

    def tokens(self, captions) -> np.ndarray:
        """Captions -> (B, context_length) int64 ids: <bos> ... <eos> <pad>..."""
        encodings = self.tokenizer.encode_batch([str(c) for c in captions])
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(captions), self.cfg.context_length)

    def __call__(self, batch: dict) -> dict:
        return {"image": self.images(batch["image"]), "tokens": self.tokens(batch["caption"])}
