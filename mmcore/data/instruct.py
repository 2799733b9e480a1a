"""Instruction turns of a dataset row: an instruction dataset's conversation as written (`conversation`), or
turns derived from a caption dataset's row, deterministically (nothing new is stored).

What the fusion and unified stages read, a row -> its turns: `training_questions(row, seed, epoch)` while
training, `questions(row, held_out)` for evaluation. Every row can be asked for its caption; rows of the
sample corpus also answer questions about their attribute columns (data/synthetic/questions.py: colour,
shape, count, relation, yes/no against a foil, the digit). Each question type has seen wordings
(training and evaluation) and held-out ones, which only evaluation uses: the difference measures whether
the model learned the question or the wording.

A turn becomes a chat: `<bos> <|user|> <image> question <|assistant|> answer <eos>`, and the loss counts
the answer's tokens and its <eos> only. On an imported LM the chat is its own template's (`TemplateChat`):
the user's message `<image>` + newline + question, the loss on what the template writes after the prompt
(the answer and the tokens that end a turn).

Packed (`data.pack_length`), one training sequence carries several of the row's questions after one
shared `<bos> <|user|> <image>`: each question sees that prefix and itself only, at the positions it
would have alone (models/decoder.py's `Packing`), so the model learns from several questions for
the cost of one image.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from mmcore.data.conversations import stored_turns
from mmcore.data.synthetic import questions as attributes
from mmcore.data.tokenizer import ASSISTANT, BOS, EOS, IMAGE, PAD, USER
from mmcore.models.generate import IGNORE
from mmcore.models.preprocess import Preprocessor, PreprocessConfig

CAPTION_TEMPLATES = (("describe the image.", "what does the picture show?", "write a caption for this image.",
                      "give a short description of this image.", "what is in the picture?", "caption this image."),
                     ("tell me what you see in this picture.",))
"""(seen, held-out) wordings of the caption request, which every row of every dataset can answer."""
TEMPLATES = {"caption": CAPTION_TEMPLATES, **attributes.TEMPLATES}
CAPTION_PROMPT = CAPTION_TEMPLATES[0][0]
"""The prompt evaluation asks for a caption with (captioning; the compositional probe, scoring): seen."""
SHARED = 3
"""<bos> <|user|> <image>: the prefix every question about one image shares in a packed sequence."""
ROW_COLUMNS = ["key", "caption", *attributes.COLUMNS, "conversations"]
"""Columns a sample can be derived from; a dataset without the attribute columns gets captions only, one of
conversations (an instruction dataset) its conversations."""


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str
    held_out: bool = False


def row_rng(row: dict, *salt: int) -> np.random.Generator:
    return np.random.default_rng([*salt, zlib.crc32(str(row["key"]).encode())])


def _kinds(row: dict) -> list[str]:
    """The question types a row can answer, in a fixed order: the caption request, then the corpus's."""
    return ["caption", *attributes.kinds(row)]


def _question(kind: str, template: str, row: dict, truth: bool, held_out: bool = False) -> Question:
    question, answer = (template, row["caption"]) if kind == "caption" else attributes.ask(kind, template, row, truth)
    return Question(kind, question, answer, held_out)


def questions(row: dict, held_out: bool = False) -> list[Question]:
    """A row's turns for evaluation: one question per type the row can answer, worded by a seen (or a
    held-out) template chosen by the row."""
    rng = row_rng(row, 7, int(held_out))
    out = []
    for kind in _kinds(row):
        truth = bool(rng.random() < 0.5) if kind == "yes_no" else True
        out.append(_question(kind, str(rng.choice(TEMPLATES[kind][1 if held_out else 0])), row, truth, held_out))
    return out


def training_questions(row: dict, seed: int, epoch: int, captions_only: bool = False) -> list[Question]:
    """A row's turns for training: every question type the row can answer (or, `captions_only`, the caption
    request), in an order drawn from (seed, epoch, key), each worded by a seen template drawn the same way,
    with or without an opening and a closing (attributes.OPENINGS)."""
    rng = row_rng(row, seed, epoch)
    kinds = ["caption"] if captions_only else _kinds(row)
    out = []
    for kind in (kinds[i] for i in rng.permutation(len(kinds))):
        template = str(rng.choice(TEMPLATES[kind][0]))
        if kind in attributes.ONE_WORD:
            template = (str(rng.choice(attributes.OPENINGS)) if rng.random() < 0.5 else "") + template
            template += str(rng.choice(attributes.CLOSINGS)) if rng.random() < 1 / 3 else ""
        out.append(_question(kind, template, row, truth=bool(rng.random() < 0.5) if kind == "yes_no" else True))
    return out


def training_question(row: dict, seed: int, epoch: int, captions_only: bool = False) -> Question:
    """The row's question for this epoch when a sequence holds one: the first of `training_questions`."""
    return training_questions(row, seed, epoch, captions_only)[0]


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
            answer = self.tokenizer.encode(turn.answer, add_special_tokens=False).ids + [self.eos]
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

    def encode_conversation(self, turns: list[Question], length: int = 0) -> tuple[list[int], list[int], list[int],
                                                                                   list[int], bool, int]:
        """A conversation (an instruction dataset's row) in one causal sequence, cut to the model's context (its
        positions) and padded to `length` tokens (default the context): each answer sees the turns before it.
        -> encode_packed's tuple: segments 0 on the shared prefix and 1 on the rest (one question's, as packing
        counts), positions 0.., and the number of answers that begin inside the sequence."""
        ids, labels = self._conversation(turns)
        fits = self.context_length
        answers = sum(1 for i in range(1, min(len(ids), fits)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
        truncated, ids, labels = len(ids) > fits, ids[:fits], labels[:fits]
        pad = (length or self.context_length) - len(ids)
        return (ids + [self.pad] * pad, labels + [IGNORE] * pad, [0] * SHARED + [1] * (len(ids) - SHARED) + [-1] * pad,
                list(range(len(ids))) + [0] * pad, truncated, answers)

    def encode_packed(self, asked: list[Question], length: int) -> tuple[list[int], list[int], list[int], list[int],
                                                                        bool, int]:
        """Questions about one image in one sequence of `length` tokens: the shared <bos> <|user|> <image>,
        then each question's turn (question, <|assistant|>, answer, <eos>) while it fits, in order, a
        turn that does not fit left out. -> (input_ids, labels, segments, positions, truncated,
        questions): segments 0 on the shared prefix, k on the k-th turn, -1 on padding; positions
        where each token stands in the question's own sequence (0 on padding). `length` is at least
        the context, so the first question always fits."""
        ids, labels, truncated = self._turn(asked[0].question, asked[0].answer)
        segments, positions = [0] * SHARED + [1] * (len(ids) - SHARED), list(range(len(ids)))
        for question in asked[1:]:
            turn_ids, turn_labels, cut = self._turn(question.question, question.answer)
            turn_ids, turn_labels = turn_ids[SHARED:], turn_labels[SHARED:]
            if len(ids) + len(turn_ids) > length:
                continue
            segments += [segments[-1] + 1] * len(turn_ids)
            positions += range(SHARED, SHARED + len(turn_ids))
            ids, labels, truncated = ids + turn_ids, labels + turn_labels, truncated or cut
        pad = length - len(ids)
        return (ids + [self.pad] * pad, labels + [IGNORE] * pad, segments + [-1] * pad, positions + [0] * pad,
                truncated, segments[-1])


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


def _messages(turns: list[Question]) -> list[dict]:
    """Turns as chat-template messages, <image> opening the first user message."""
    return [m for k, turn in enumerate(turns) for m in (
        {"role": "user", "content": turn.question if k else f"{IMAGE}\n{turn.question}"},
        {"role": "assistant", "content": turn.answer})]


def instruction_batch(rows: list[dict], chat: ChatFormat, seed: int, pack_length: int = 0,
                      captions_only: bool = False) -> dict[str, np.ndarray]:
    """Training rows (with an `epoch`) -> input_ids, labels (B, context) int64 and truncated (B,) int64:
    one question a row; with `pack_length`, all the row's questions that fit in that many tokens (B,
    pack_length), with segments and positions (B, pack_length) and the number of questions (B,).
    `captions_only`: the caption request alone."""
    encoded = [_encoded(row, chat, seed, pack_length, captions_only) for row in rows]
    keys = ("input_ids", "labels", "segments", "positions", "truncated", "questions") if pack_length else \
        ("input_ids", "labels", "truncated")
    shapes = {"truncated": (len(rows),), "questions": (len(rows),)}
    width = pack_length or chat.context_length
    return {key: np.array([e[i] for e in encoded], np.int64).reshape(shapes.get(key, (len(rows), width)))
            for i, key in enumerate(keys)}


def _encoded(row: dict, chat: ChatFormat, seed: int, pack_length: int, captions_only: bool) -> tuple:
    """One row's sequence: its conversation (an instruction dataset's row), else this epoch's questions
    derived from it."""
    turns, epoch = conversation(row), int(row.get("epoch") or 0)
    if pack_length:
        return chat.encode_conversation(turns, pack_length) if turns else \
            chat.encode_packed(training_questions(row, seed, epoch, captions_only), pack_length)
    if turns:
        ids, labels, _, _, truncated, _ = chat.encode_conversation(turns)
        return ids, labels, truncated
    asked = training_question(row, seed, epoch, captions_only)
    return chat.encode(asked.question, asked.answer)


def conversation(row: dict) -> list[Question] | None:
    """An instruction dataset's row: its conversation's turns (question, answer) in order (data/conversations.py
    stored them); None for a row of a caption dataset."""
    if not row.get("conversations"):
        return None
    return [Question("conversation", question, answer) for question, answer in stored_turns(row["conversations"])]


class InstructPreprocessor(Preprocessor):
    """The fusion stage's stream: uint8 pixels, and per row this epoch's question and answer as chat ids."""

    columns = ["image", *ROW_COLUMNS]

    def __init__(self, cfg: PreprocessConfig, tokenizer_json: str, augment: bool = False, seed: int = 0,
                 pack_length: int = 0, captions_only: bool = False):
        super().__init__(cfg, tokenizer_json, augment)
        if pack_length and pack_length < cfg.context_length:
            raise ValueError(f"data.pack_length {pack_length} is shorter than the model's context of "
                             f"{cfg.context_length} tokens: one question would not fit")
        self.seed, self.pack_length, self.captions_only = seed, pack_length, captions_only
        self._chat: ChatFormat | None = None

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat.of(self)
        return self._chat

    def __getstate__(self):
        return {**super().__getstate__(), "_chat": None}

    def __call__(self, batch: dict) -> dict:
        return {"image": self.batch_pixels(batch["image"]),
                **instruction_batch(batch_rows(batch), self.chat, self.seed, self.pack_length, self.captions_only)}


def batch_rows(batch: dict) -> list[dict]:
    """A Ray Data batch (numpy columns) -> one dict of plain Python values per row: ROW_COLUMNS and
    the epoch, None where the dataset lacks a column."""
    def plain(value):
        return value.item() if isinstance(value, np.generic) else value

    columns = [*ROW_COLUMNS, "epoch"]
    rows = len(next(iter(batch.values()))) if batch else 0
    return [{c: (plain(batch[c][i]) if c in batch else None) for c in columns} for i in range(rows)]
