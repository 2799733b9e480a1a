"""Mixed-modal training samples for the unified stage, derived from a row in the Ray Data step
(deterministic in (seed, epoch, row key); nothing new is stored).

Per row and epoch, one of:
- **reading**: the fusion stage's chat about the image (instruct.py): an instruction dataset's row its
  conversation, a caption dataset's row (the share 1 - data.draw_fraction of them) the request for its
  caption; loss on the answers;
- **drawing** (data.draw_fraction of a caption dataset's rows): `<bos> caption <|image_start|> codes
  <|image_end|> <eos>`, loss on the codes, the end marker and <eos>; one drawing sample in ten drops the
  caption, which teaches the unconditional image the classifier-free guidance of `generate_image`
  subtracts. On an imported LM with its own chat template, the caption is the user's message in that
  template and the image the assistant's turn.

A recipe mixes a caption dataset (drawing) with an instruction dataset (reading) by weight (data.mix).
With `data.pack_length`, a reading sample packs its conversation as the fusion stage's do (instruct.py),
and a drawing sample is padded to the same length; the image's span stands in the shared prefix.

The image's codes come from the registered image tokenizer: read from its derived version of the dataset
(data/derived.py: computed once, the default; `reading("codes")`), or (images augmented, `data.augment`) made here
on the data workers' CPUs; the trainers see token ids only (what each costs: experiments/unified-codes).
"""

from __future__ import annotations

import numpy as np
import torch

from mmcore.data.instruct import ROW_COLUMNS, ChatFormat, InstructPreprocessor, batch_rows, row_rng, training_turns
from mmcore.data.tokenizer import IMAGE_END, IMAGE_START, code_offset
from mmcore.models.generate import IGNORE
from mmcore.models.imagetok import ImageTokenizer, ImageTokenizerConfig
from mmcore.models.preprocess import PreprocessConfig, normalize

UNCONDITIONAL_FRACTION = 0.1
"""Of the drawing samples, those without a caption."""


def expand_image(ids: list[int], labels: list[int], image: list[int], labelled: bool, image_id: int,
                 segments: list[int] | None = None, positions: list[int] | None = None) -> tuple[list[int], ...]:
    """Replace the one <image> id (`image_id`) by the image's ids (start, codes, end); their labels are the ids
    themselves when the image is what the sample teaches to draw (the start marker is given by the
    prompt, so it is not counted). A packed sample's segments and positions (instruct.py) are
    expanded with them: the span takes the <image> token's segment and the positions from its own,
    and the positions after it move along by the span's extra length."""
    at, extra = ids.index(image_id), len(image) - 1
    span_labels = [IGNORE, *image[1:]] if labelled else [IGNORE] * len(image)
    out = ids[:at] + image + ids[at + 1:], labels[:at] + span_labels + labels[at + 1:]
    if segments is None or positions is None:
        return out
    image_at = positions[at]
    return (*out, segments[:at] + [segments[at]] * len(image) + segments[at + 1:],
            positions[:at] + list(range(image_at, image_at + len(image)))
            + [p + extra if p > image_at else p for p in positions[at + 1:]])


class MixedFormat:
    """Token ids of the drawing sample, after the chat format's drawing prompt (mmpipe's `<bos> caption`, or
    an imported LM's template around the caption); reading samples are the chat format's own."""

    def __init__(self, chat: ChatFormat):
        self.chat, self.context_length = chat, chat.context_length
        tokenizer = chat.tokenizer
        self.start, self.end = tokenizer.token_to_id(IMAGE_START), tokenizer.token_to_id(IMAGE_END)
        self.offset = code_offset(tokenizer)
        """Image code c is token offset + c (its named token in the tokenizer)."""

    def drawing(self, caption: str, length: int = 0) -> tuple[list[int], list[int], bool]:
        """drawing prompt, <image>, end of turn: the caption cut to fit the context, padded to `length`
        (default: the context)."""
        chat = self.chat
        prompt, cut = chat.drawing_prompt(caption, self.context_length - 2)
        ids = [*prompt, chat.image, chat.eos]
        labels = [IGNORE] * (len(ids) - 1) + [chat.eos]
        pad = (length or self.context_length) - len(ids)
        return ids + [chat.pad] * pad, labels + [IGNORE] * pad, cut

    def image(self, codes: np.ndarray) -> list[int]:
        """An image's codes as the ids of its span: <|image_start|> <|image_code_c|> ... <|image_end|>."""
        return [self.start, *(int(c) + self.offset for c in codes), self.end]


class MixedPreprocessor(InstructPreprocessor):
    """The unified stage's stream: per row this epoch's reading or drawing sample as one sequence of
    text and image ids (`input_ids`, `labels`: context (or pack_length) + codes + 1 long), `truncated`
    and `drawing`; packed, also `segments`, `positions` and `questions` (0 for a drawing)."""

    columns = ["image", *ROW_COLUMNS]

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, image_tokenizer: dict, seed: int = 0,
                 pack_length: int = 0, draw_fraction: float = 0.5):
        super().__init__(cfg, tokenizer_json, seed=seed, pack_length=pack_length)
        self.draw_fraction = draw_fraction
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

    def sample(self, row: dict, image: list[int]) -> dict:
        """One row's sample for this epoch: reading or drawing, its image expanded inline."""
        epoch = int(row.get("epoch") or 0)
        rng = row_rng(row, self.seed, epoch, 11)
        drawing = not row.get("conversations") and bool(rng.random() < self.draw_fraction)
        segments = positions = None
        questions = 0
        if drawing:
            caption = "" if rng.random() < UNCONDITIONAL_FRACTION else str(row["caption"])
            ids, labels, truncated = self._format.drawing(caption, self.pack_length)
            if self.pack_length:  # one sequence, then padding
                segments = [-1 if i == self.chat.pad else 1 for i in ids]
                positions = [k if segment > 0 else 0 for k, segment in enumerate(segments)]
        else:
            ids, labels, segments, positions, truncated, questions = self.chat.encode_conversation(
                training_turns(row, self.seed, epoch), self.pack_length)
            if not self.pack_length:
                segments = positions = None
        expanded = expand_image(ids, labels, image, drawing, self.chat.image, segments, positions)
        out = {"input_ids": expanded[0], "labels": expanded[1], "truncated": truncated, "drawing": drawing}
        if self.pack_length:
            out |= {"segments": expanded[2], "positions": expanded[3], "questions": questions}
        return out

    def __call__(self, batch: dict) -> dict:
        if self._format is None:
            self._format = MixedFormat(self.chat)
        codes = np.stack(batch["codes"]) if "codes" in batch else self.codes(self.batch_pixels(batch["image"]))
        samples = [self.sample(row, self._format.image(row_codes)) for row, row_codes in zip(batch_rows(batch), codes)]
        return {key: np.asarray([s[key] for s in samples], np.int64) for key in samples[0]}
