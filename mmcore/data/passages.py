"""The language stage's training text, from a row (nothing new is stored): an instruction dataset's
conversation as a chat, its image left out, or a caption dataset's caption alone.

    <bos> <|user|> question <|assistant|> answer <eos> <|user|> question <|assistant|> answer <eos> ...
    <bos> caption <eos>

This is the chat format the language model is saved with (models/causal_lm.py CHAT_TEMPLATE; a test
holds the two token for token). Two losses: on the answers (`labels`: each answer and its <eos>) and on
the text the chat is about (`text_labels`: the questions and their role tokens; a caption alone), weighed
by task.text_loss: the stage learns the language of the captions and the questions, and to answer them
(data.mix trains on a caption dataset and an instruction dataset together).
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from mmcore.data.instruct import ROW_COLUMNS, batch_rows, conversation
from mmcore.data.tokenizer import ASSISTANT, BOS, EOS, PAD, USER
from mmcore.models.generate import IGNORE
from mmcore.models.preprocess import Preprocessor, PreprocessConfig


def passage(row: dict) -> list[tuple[str, str]]:
    """The row's chat: its conversation's (user, assistant) turns; empty for a caption dataset's row (its
    caption alone is the sample)."""
    return [(turn.question, turn.answer) for turn in conversation(row) or []]


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

    def encode(self, row: dict) -> tuple[list[int], list[int], list[int], bool]:
        """(input_ids, labels, text_labels, truncated), context_length long: whole turns while they fit (the
        first one cut if it alone does not); labels the answers' ids, text_labels the rest's (IGNORE elsewhere
        and on padding)."""
        i = self.ids
        turns = passage(row)
        if not turns:
            ids = [i[BOS], *self._text(row["caption"]), i[EOS]]
            labels, text = [IGNORE] * len(ids), list(ids)
        else:
            ids, labels, text = [i[BOS]], [IGNORE], [IGNORE]
            for user, answer in turns:
                asked, said = [i[USER], *self._text(user), i[ASSISTANT]], [*self._text(answer), i[EOS]]
                if len(ids) > 1 and len(ids) + len(asked) + len(said) > self.context_length:
                    break
                ids += asked + said
                labels += [IGNORE] * len(asked) + said
                text += asked + [IGNORE] * len(said)
        truncated = len(ids) > self.context_length
        pad = max(0, self.context_length - len(ids))
        return ([*ids[: self.context_length], *[i[PAD]] * pad], [*labels[: self.context_length], *[IGNORE] * pad],
                [*text[: self.context_length], *[IGNORE] * pad], truncated)


class TextPreprocessor(Preprocessor):
    """The language stage's stream: per row its passage as token ids (no image is read)."""

    columns = list(ROW_COLUMNS)

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, augment: bool = False):
        super().__init__(cfg, tokenizer_json, augment)
        self._format: TextFormat | None = None

    @property
    def format(self) -> TextFormat:
        if self._format is None:
            self._format = TextFormat(Tokenizer.from_str(self.tokenizer_json), self.cfg.context_length)
        return self._format

    def __getstate__(self):
        return {**super().__getstate__(), "_format": None}

    def __call__(self, batch: dict) -> dict:
        encoded = [self.format.encode(row) for row in batch_rows(batch)]
        shape = (len(encoded), self.cfg.context_length)
        return {**{key: np.array([e[k] for e in encoded], np.int64).reshape(shape)
                   for k, key in enumerate(("input_ids", "labels", "text_labels"))},
                "truncated": np.array([e[3] for e in encoded], np.int64)}
