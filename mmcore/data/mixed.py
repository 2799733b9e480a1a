"""Mixed-modal training samples for the unified stage, derived from a row in the Ray Data step
(deterministic in (seed, epoch, row key); nothing new is stored).

Per row and epoch, one of:
- **reading** (half the rows): the fusion stage's chat about the image (instruct.py: its caption, or
  a colour / shape / count / relation / yes-no / digit question), loss on the answer;
- **drawing**: `<bos> caption <|image_start|> codes <|image_end|> <eos>`, loss on the codes, the end
  marker and <eos>; one drawing sample in ten drops the caption, which teaches the unconditional
  image the classifier-free guidance of `generate_image` subtracts.

The image's codes come from the registered image tokenizer, run here on the data workers' CPUs:
the trainers then see token ids only (why not a derived token dataset: docs/benchmarks.md,
"unified-codes", from bench/unified_codes.py).
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from mmcore.data.instruct import ROW_COLUMNS, InstructPreprocessor, batch_rows, row_rng, training_question
from mmcore.data.tokenizer import BOS, EOS, IMAGE_END, IMAGE_START, PAD
from mmcore.models.generate import IGNORE, IMAGE_ID
from mmcore.models.imagetok import ImageTokenizer, ImageTokenizerConfig
from mmcore.models.preprocess import PreprocessConfig, normalize

DRAW_FRACTION = 0.5
UNCONDITIONAL_FRACTION = 0.1
"""Of the drawing samples, those without a caption."""


def expand_image(ids: list[int], labels: list[int], image: list[int], labelled: bool) -> tuple[list[int], list[int]]:
    """Replace the one <image> id by the image's ids (start, codes,
    end); their labels are the ids themselves when the image is what the sample teaches to draw
    (the start marker is given by the prompt, so it is not counted)."""
    at = ids.index(IMAGE_ID)
    span_labels = [IGNORE, *image[1:]] if labelled else [IGNORE] * len(image)
    return ids[:at] + image + ids[at + 1:], labels[:at] + span_labels + labels[at + 1:]


class MixedFormat:
    """Token ids of the drawing sample; reading samples use the chat format of the fusion stage."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, PAD, IMAGE_START, IMAGE_END)}
        self.offset = tokenizer.get_vocab_size()
        """Image code c is token offset + c (the unified model's vocabulary)."""
        if [self.ids[IMAGE_START], self.ids[IMAGE_END]] != [self.offset - 2, self.offset - 1]:
            raise ValueError("the unified stage's tokenizer must end with <|image_start|> <|image_end|> "
                             "(data.tokenizer.with_tokens adds them)")

    def drawing(self, caption: str) -> tuple[list[int], list[int], bool]:
        """<bos> caption <image> <eos>, padded to the context (the caption is cut if it must be)."""
        i = self.ids
        text = self.tokenizer.encode(caption, add_special_tokens=False).ids if caption else []
        room = self.context_length - 3
        ids = [i[BOS], *text[:room], IMAGE_ID, i[EOS]]
        labels = [IGNORE] * (len(ids) - 1) + [i[EOS]]
        pad = self.context_length - len(ids)
        return ids + [i[PAD]] * pad, labels + [IGNORE] * pad, len(text) > room

    def image(self, codes: np.ndarray) -> list[int]:
        """An image's codes as the ids of its span: <|image_start|> offset + code ... <|image_end|>."""
        return [self.ids[IMAGE_START], *(int(c) + self.offset for c in codes), self.ids[IMAGE_END]]


class MixedPreprocessor(InstructPreprocessor):
    """The unified stage's stream: per row this epoch's reading or drawing sample as one sequence of
    text and image ids (`input_ids`, `labels`: context + codes + 1 long), `truncated` and `drawing`."""

    columns = ["image", *ROW_COLUMNS]

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, image_tokenizer: dict, seed: int = 0):
        super().__init__(cfg, tokenizer_json, seed=seed)
        self.image_tokenizer = image_tokenizer
        """{"config": the tokenizer's architecture, "state": its weights as numpy arrays}."""
        self._encoder: ImageTokenizer | None = None
        self._format: MixedFormat | None = None

    def __getstate__(self):
        return {**super().__getstate__(), "_encoder": None, "_format": None}

    def codes(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) uint8 -> (B, grid * grid) codes of the image tokenizer."""
        if self._encoder is None:
            torch.set_num_threads(1)  # a data worker's share of the CPU
            model = ImageTokenizer(ImageTokenizerConfig(**self.image_tokenizer["config"]))
            model.load_state_dict({k: torch.tensor(v) for k, v in self.image_tokenizer["state"].items()})
            self._encoder = model.eval()
        with torch.no_grad():
            return self._encoder.encode(normalize(torch.from_numpy(pixels), self.mean, self.std)).numpy()

    def __call__(self, batch: dict) -> dict:
        if self._format is None:
            self._format = MixedFormat(Tokenizer.from_str(self.tokenizer_json), self.cfg.context_length)
        rows = batch_rows(batch)
        codes = self.codes(self.batch_pixels(batch["image"]))
        out = {"input_ids": [], "labels": [], "truncated": [], "drawing": []}
        for row, row_codes in zip(rows, codes):
            rng = row_rng(row, self.seed, int(row.get("epoch") or 0), 11)
            drawing = bool(rng.random() < DRAW_FRACTION)
            if drawing:
                caption = "" if rng.random() < UNCONDITIONAL_FRACTION else str(row["caption"])
                ids, labels, truncated = self._format.drawing(caption)
            else:
                question = training_question(row, self.seed, int(row.get("epoch") or 0))
                ids, labels, truncated = self.chat.encode(question.question, question.answer)
            ids, labels = expand_image(ids, labels, self._format.image(row_codes), labelled=drawing)
            for key, value in zip(out, (ids, labels, truncated, drawing)):
                out[key].append(value)
        return {key: np.asarray(value, np.int64) for key, value in out.items()}
