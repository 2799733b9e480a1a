"""The language stage's training text, derived from a row (nothing new is stored): its caption, then
questions about it and their answers as a chat, in the wordings the fusion stage trains on (never the
held-out ones, which only evaluation asks).

    <bos> <|user|> caption \n question <|assistant|> answer <eos> <|user|> question <|assistant|> answer <eos> ...

This is the chat format the language model is saved with (models/causal_lm.py CHAT_TEMPLATE; a test
holds the two token for token). A row with no question to answer (a photo, a web pair) is its caption
alone: `<bos> caption <eos>`. The loss counts every token but the padding: the stage learns the
language of the captions and the questions, and to answer from a caption it reads.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from mmcore.data.instruct import ROW_COLUMNS, Question, batch_rows, training_questions
from mmcore.data.tokenizer import ASSISTANT, BOS, EOS, PAD, USER
from mmcore.models.generate import IGNORE
from mmcore.models.preprocess import Preprocessor, PreprocessConfig


def about_caption(caption: str, question: str) -> str:
    """A question about a caption given in text, as the language stage trains on it and the text suite asks it."""
    return f"{caption}\n{question}"


def passage(row: dict, seed: int, epoch: int) -> list[tuple[str, str]]:
    """The row's chat for this epoch: (user, assistant) turns, the caption in the first user turn; empty
    when the row answers no question (its caption alone is the sample)."""
    asked: list[Question] = [q for q in training_questions(row, seed, epoch) if q.kind != "caption"]
    return [(about_caption(row["caption"], q.question) if i == 0 else q.question, q.answer)
            for i, q in enumerate(asked)]


class TextFormat:
    """Token ids of the language stage's samples, cut to the context."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.ids = {t: tokenizer.token_to_id(t) for t in (BOS, USER, ASSISTANT, EOS, PAD)}
        missing = [t for t, i in self.ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the chat tokens {missing}; the language stage adds them "
                             "(data.tokenizer.with_chat_tokens)")

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, row: dict, seed: int, epoch: int) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated), context_length long: whole turns while they fit (the first one
        cut if it alone does not), labels the ids themselves, IGNORE on padding."""
        i = self.ids
        turns = passage(row, seed, epoch)
        if not turns:
            ids = [i[BOS], *self._text(row["caption"]), i[EOS]]
        else:
            ids = [i[BOS]]
            for user, answer in turns:
                turn = [i[USER], *self._text(user), i[ASSISTANT], *self._text(answer), i[EOS]]
                if len(ids) > 1 and len(ids) + len(turn) > self.context_length:
                    break
                ids += turn
        truncated = len(ids) > self.context_length
        ids = ids[: self.context_length]
        pad = self.context_length - len(ids)
        return ids + [i[PAD]] * pad, ids + [IGNORE] * pad, truncated


class TextPreprocessor(Preprocessor):
    """The language stage's stream: per row this epoch's passage as token ids (no image is read)."""

    columns = list(ROW_COLUMNS)

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, augment: bool = False, seed: int = 0):
        super().__init__(cfg, tokenizer_json, augment)
        self.seed = seed
        self._format: TextFormat | None = None

    @property
    def format(self) -> TextFormat:
        if self._format is None:
            self._format = TextFormat(Tokenizer.from_str(self.tokenizer_json), self.cfg.context_length)
        return self._format

    def __getstate__(self):
        return {**super().__getstate__(), "_format": None}

    def __call__(self, batch: dict) -> dict:
        encoded = [self.format.encode(row, self.seed, int(row.get("epoch") or 0)) for row in batch_rows(batch)]
        return {"input_ids": np.array([e[0] for e in encoded], np.int64).reshape(len(encoded), self.cfg.context_length),
                "labels": np.array([e[1] for e in encoded], np.int64).reshape(len(encoded), self.cfg.context_length),
                "truncated": np.array([e[2] for e in encoded], np.int64)}
