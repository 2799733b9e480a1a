"""Instruction turns of a dataset row, what the fusion and unified stages train on: an instruction dataset's
conversation as written (`conversation`), or, for a caption dataset's row, the request for its caption
(`caption_request`, worded by a seen template drawn from (seed, epoch, key); nothing new is stored). Questions
about the sample corpus's attribute columns reach training as its conversation file, like a user's
(data/synthetic/questions.py writes them; evaluation asks them, and their held-out wordings, from there).

A turn becomes a chat: `<bos> <|user|> <image> question <|assistant|> answer <eos>`, a later turn of a
conversation `<|user|> question <|assistant|> answer <eos>`, and the loss counts the answers' tokens and
their <eos> only. On an imported LM the chat is its own template's (`TemplateChat`): the user's first
message `<image>` + newline + question, the loss on what the template writes after each prompt (the answer
and the tokens that end a turn).

A conversation is cut to the model's context (its positions). Packed (`data.pack_length`), the turns that
do not fit go on in the same training sequence after the shared `<bos> <|user|> <image>`: the next turn
asked as a conversation's first, at the positions it would have alone, seeing the image and its own part
of the conversation (models/decoder.py's `Packing`), so every turn is learned for one image's cost.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from mmcore.data.conversations import stored_turns
from mmcore.data.tokenizer import ASSISTANT, BOS, EOS, IMAGE, PAD, USER
from mmcore.models.generate import IGNORE
from mmcore.models.preprocess import Preprocessor, PreprocessConfig

CAPTION_TEMPLATES = (("describe the image.", "what does the picture show?", "write a caption for this image.",
                      "give a short description of this image.", "what is in the picture?", "caption this image."),
                     ("tell me what you see in this picture.",))
"""(seen, held-out) wordings of the caption request, which every row of a caption dataset can answer."""
CAPTION_PROMPT = CAPTION_TEMPLATES[0][0]
"""The prompt evaluation asks for a caption with (captioning; the compositional probe, scoring): seen."""
SHARED = 3
"""<bos> <|user|> <image>: the prefix every part of a packed sequence shares."""
ROW_COLUMNS = ["key", "caption", "conversations"]
"""The columns a training sample is made from: a caption dataset's caption, an instruction dataset's
conversations."""


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str
    held_out: bool = False


def row_rng(row: dict, *salt: int) -> np.random.Generator:
    return np.random.default_rng([*salt, zlib.crc32(str(row["key"]).encode())])


def caption_request(row: dict, seed: int, epoch: int) -> Question:
    """A caption dataset's row in training: the request for its caption, in a seen wording drawn from
    (seed, epoch, key)."""
    return Question("caption", str(row_rng(row, seed, epoch).choice(CAPTION_TEMPLATES[0])), row["caption"])


def conversation(row: dict) -> list[Question] | None:
    """An instruction dataset's row: its conversation's turns (question, answer; the kind its question type, if
    the data named one) in order (data/conversations.py stored them); None for a row of a caption dataset."""
    if not row.get("conversations"):
        return None
    return [Question(kind or "conversation", question, answer)
            for question, answer, kind in stored_turns(row["conversations"])]


def training_turns(row: dict, seed: int, epoch: int) -> list[Question]:
    """What a row teaches: its conversation, or the request for its caption."""
    return conversation(row) or [caption_request(row, seed, epoch)]


class ChatFormat:
    """Token ids of the chat format; `encode` pads or truncates to the context and says if it truncated."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length
        ids = {t: tokenizer.token_to_id(t) for t in (BOS, USER, IMAGE, ASSISTANT, EOS, PAD)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the chat tokens {missing}; the fusion stage adds them "
                             f"(data.tokenizer.with_chat_tokens)")
        self.ids = ids
        self.eos, self.pad, self.image = ids[EOS], ids[PAD], ids[IMAGE]
        """The ids that end an answer, pad a sequence and stand for the image."""

    @classmethod
    def of(cls, preprocess: Preprocessor) -> "ChatFormat":
        """The chat format of a fusion or unified model's preprocessor: its tokenizer (without the
        preprocessor's padding) and its context; an imported LM's template when it brought one."""
        tokenizer = Tokenizer.from_str(preprocess.tokenizer_json)
        if preprocess.cfg.chat_template:
            return TemplateChat(tokenizer, preprocess.cfg.context_length, preprocess.cfg.chat_template,
                                preprocess.cfg.chat_tokens)
        return cls(tokenizer, preprocess.cfg.context_length)

    def prompt(self, question: str, history: list[Question] = ()) -> list[int]:
        """<bos> <|user|> <image> question <|assistant|>; after `history` (the turns of a conversation before
        it): those turns, then <|user|> question <|assistant|>."""
        if history:
            return self._conversation(history)[0] + self._follow_up(question)
        i = self.ids
        return [i[BOS], i[USER], i[IMAGE], *self.tokenizer.encode(question, add_special_tokens=False).ids,
                i[ASSISTANT]]

    def _follow_up(self, question: str) -> list[int]:
        return [self.ids[USER], *self.tokenizer.encode(question, add_special_tokens=False).ids, self.ids[ASSISTANT]]

    def _answer(self, answer: str) -> list[int]:
        return [*self.tokenizer.encode(answer, add_special_tokens=False).ids, self.eos]

    def drawing_prompt(self, caption: str, limit: int = 10 ** 9) -> tuple[list[int], bool]:
        """What a unified model draws after (data/mixed.py): `<bos> caption` (an empty caption: the unconditional
        prompt classifier-free guidance mixes in), cut to `limit` tokens -> (ids, cut)."""
        ids = [self.ids[BOS], *self.tokenizer.encode(caption, add_special_tokens=False).ids]
        return ids[:limit], len(ids) > limit

    def _conversation(self, turns: list[Question]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of turns in one sequence, uncut: the first turn's prompt, then `<|user|> question
        <|assistant|>` for each later one; labels on each answer and its <eos>."""
        ids, labels = [], []
        for k, turn in enumerate(turns):
            prompt = self._follow_up(turn.question) if k else self.prompt(turn.question)
            answer = self._answer(turn.answer)
            ids, labels = ids + prompt + answer, labels + [IGNORE] * len(prompt) + answer
        return ids, labels

    def _turn(self, question: str, answer: str) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated) of one question, cut to the context, unpadded."""
        ids, labels = self._conversation([Question("", question, answer)])
        return ids[: self.context_length], labels[: self.context_length], len(ids) > self.context_length

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated), each list context_length long; labels IGNORE outside the answer."""
        ids, labels, truncated = self._turn(question, answer)
        pad = self.context_length - len(ids)
        return ids + [self.pad] * pad, labels + [IGNORE] * pad, truncated

    def _part(self, turns: list[Question], start: int) -> tuple[list[int], list[int], int, bool]:
        """The longest run of whole turns from `start` that fits the context, as a conversation of its own ->
        (input_ids, labels, the turn after it, cut): at least one turn, cut to the context if it alone does
        not fit."""
        ids, labels = self._conversation(turns[start: start + 1])
        end = start + 1
        while end < len(turns):
            asked, answer = self._follow_up(turns[end].question), self._answer(turns[end].answer)
            if len(ids) + len(asked) + len(answer) > self.context_length:
                break
            ids, labels, end = ids + asked + answer, labels + [IGNORE] * len(asked) + answer, end + 1
        fits = self.context_length
        return ids[:fits], labels[:fits], end, len(ids) > fits

    def encode_conversation(self, turns: list[Question], length: int = 0) -> tuple[list[int], list[int], list[int],
                                                                                   list[int], bool, int]:
        """A conversation in one causal sequence, each answer seeing the turns before it, cut to the model's
        context; with `length` (packed, at least the context), the turns after the cut go on in parts of their
        own after the shared prefix while they fit. -> (input_ids, labels, segments, positions, truncated,
        answers), each list `length` (default: the context) long: segments 0 on the shared prefix, k on the
        k-th part, -1 on padding; positions where each token stands in its part's own sequence (0 on
        padding); truncated when a turn was cut or left out; the number of answers that begin inside."""
        width = length or self.context_length
        ids, labels, segments, positions, truncated, start = [], [], [], [], False, 0
        while start < len(turns):
            part_ids, part_labels, end, cut = self._part(turns, start)
            skip = SHARED if ids else 0
            if ids and (not length or len(ids) + len(part_ids) - skip > width):
                truncated = True
                break
            segments += [0] * SHARED + [1] * (len(part_ids) - SHARED) if not ids else \
                [segments[-1] + 1] * (len(part_ids) - skip)
            positions += range(skip, len(part_ids))
            ids, labels, truncated, start = ids + part_ids[skip:], labels + part_labels[skip:], truncated or cut, end
        answers = sum(1 for i in range(1, len(ids)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
        pad = width - len(ids)
        return (ids + [self.pad] * pad, labels + [IGNORE] * pad, segments + [-1] * pad, positions + [0] * pad,
                truncated, answers)


class TemplateChat(ChatFormat):
    """An imported LM's own chat template (Jinja, rendered as transformers renders it): the prompt is the
    user's message `<image>` + newline + question with the template's generation prompt; the labels are what
    the template writes after it for the answer. Not packed (data.pack_length must be 0)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, template: str, tokens: dict):
        from transformers import PreTrainedTokenizerFast

        self.tokenizer, self.context_length, self.template = tokenizer, context_length, template
        self._renderer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **tokens)
        pad = tokens.get("pad_token") or tokens.get("eos_token")
        if tokenizer.token_to_id(IMAGE) is None or pad is None or tokenizer.token_to_id(pad) is None:
            raise ValueError(f"the tokenizer lacks {IMAGE} or a padding token ({pad}); the fusion and unified "
                             f"stages add {IMAGE} (tasks) and an import names the padding")
        self.pad, self.image = tokenizer.token_to_id(pad), tokenizer.token_to_id(IMAGE)
        self.eos = tokenizer.token_to_id(tokens.get("eos_token") or pad)

    def overhead(self) -> int:
        """Tokens the template adds to a turn beyond mmpipe's format (`<bos> <|user|> <image>`, `<|assistant|>`,
        `<eos>`): what the text context grows by."""
        ids, _, _ = self._turn("", "")
        return max(0, len(ids) - 5)

    def _render(self, messages: list[dict], generation: bool) -> list[int]:
        text = self._renderer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def prompt(self, question: str, history: list[Question] = ()) -> list[int]:
        asked = {"role": "user", "content": question if history else f"{IMAGE}\n{question}"}
        return self._render([*_messages(history), asked], generation=True)

    def drawing_prompt(self, caption: str, limit: int = 10 ** 9) -> tuple[list[int], bool]:
        """The caption as the user's message with the template's generation prompt; a caption too long for
        `limit` tokens is cut (its tokens) and rendered again."""
        ids = self._render([{"role": "user", "content": caption}], generation=True)
        if len(ids) <= limit:
            return ids, False
        words = self.tokenizer.encode(caption, add_special_tokens=False).ids
        kept = self.tokenizer.decode(words[:max(0, len(words) - (len(ids) - limit))])
        return self._render([{"role": "user", "content": kept}], generation=True)[:limit], True

    def _conversation(self, turns: list[Question]) -> tuple[list[int], list[int]]:
        """The turns as the template renders them (<image> in the first user message); labels on what it writes
        after each generation prompt."""
        ids, labels = [], []
        for k in range(len(turns)):
            prompt = self.prompt(turns[k].question, turns[:k])
            full = self._render(_messages(turns[: k + 1]), generation=False)
            if prompt[: len(ids)] != ids or full[: len(prompt)] != prompt:
                raise ValueError("the chat template writes a turn differently when more of the conversation "
                                 "follows; its answers cannot be told apart for the loss")
            labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt):]
            ids = full
        return ids, labels


    def _part(self, turns: list[Question], start: int) -> tuple[list[int], list[int], int, bool]:
        """The turns from `start` as the template renders them, cut to the context (a template's conversation is
        not packed)."""
        ids, labels = self._conversation(turns[start:])
        fits = self.context_length
        return ids[:fits], labels[:fits], len(turns), len(ids) > fits


def _messages(turns: list[Question]) -> list[dict]:
    """Turns as chat-template messages, <image> opening the first user message."""
    return [m for k, turn in enumerate(turns) for m in (
        {"role": "user", "content": turn.question if k else f"{IMAGE}\n{turn.question}"},
        {"role": "assistant", "content": turn.answer})]


def instruction_batch(rows: list[dict], chat: ChatFormat, seed: int, pack_length: int = 0) -> dict[str, np.ndarray]:
    """Training rows (with an `epoch`) -> input_ids, labels (B, context) int64 and truncated (B,) int64: each
    row's conversation, or the request for its caption (training_turns), cut to the context; with
    `pack_length`, (B, pack_length) with the turns after the cut packed, segments and positions (B,
    pack_length) and the number of answers (B,) (`questions`)."""
    encoded = [chat.encode_conversation(training_turns(row, seed, int(row.get("epoch") or 0)), pack_length)
               for row in rows]
    keys = {"input_ids": 0, "labels": 1, "segments": 2, "positions": 3, "truncated": 4, "questions": 5} \
        if pack_length else {"input_ids": 0, "labels": 1, "truncated": 4}
    return {key: np.array([e[i] for e in encoded], np.int64) for key, i in keys.items()}


class InstructPreprocessor(Preprocessor):
    """The fusion stage's stream: uint8 pixels (or, `reading("features")`, a frozen tower's tokens of the image:
    `image_features`, (B, tokens * width)), and per row its conversation or its caption request as chat ids."""

    columns = ["image", *ROW_COLUMNS]

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, augment: bool = False, seed: int = 0,
                 pack_length: int = 0):
        super().__init__(cfg, tokenizer_json, augment)
        if pack_length and pack_length < cfg.context_length:
            raise ValueError(f"data.pack_length {pack_length} is shorter than the model's context of "
                             f"{cfg.context_length} tokens: one question would not fit")
        self.seed, self.pack_length = seed, pack_length
        self._chat: ChatFormat | None = None

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat.of(self)
        return self._chat

    def __getstate__(self):
        return {**super().__getstate__(), "_chat": None}

    def reading(self, column: str) -> "InstructPreprocessor":
        """The same preprocessing on rows that carry a derived version's `column` (data/derived.py: the image's
        codes, its tower's features) instead of the image."""
        clone = copy.copy(self)
        clone.columns = [c for c in self.columns if c != "image"] + [column]
        return clone

    def __call__(self, batch: dict) -> dict:
        image = {"image_features": np.stack(batch["features"])} if "features" in batch \
            else {"image": self.batch_pixels(batch["image"])}
        return {**image, **instruction_batch(batch_rows(batch), self.chat, self.seed, self.pack_length)}


def batch_rows(batch: dict) -> list[dict]:
    """A Ray Data batch (numpy columns) -> one dict of plain Python values per row: ROW_COLUMNS and
    the epoch, None where the dataset lacks a column."""
    def plain(value):
        return value.item() if isinstance(value, np.generic) else value

    columns = [*ROW_COLUMNS, "epoch"]
    rows = len(next(iter(batch.values()))) if batch else 0
    return [{c: (plain(batch[c][i]) if c in batch else None) for c in columns} for i in range(rows)]
