"""Instruction data: LLaVA's conversation format read into the rows ingest downloads and filters.

A file is a JSON array, or JSON lines, of `{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}` (ShareGPT's "user" / "assistant" roles too; a human
turn may name its question's `"type"`, which the vqa suite scores apart). `image`
is a URL (fetched through the URL guard like any other) or a path relative to `source.images`, which the
guard's `images:` handler reads (urlguard.py). Each row is checked here, before any download; a row that
fails is rejected with its reason (reasons.REASONS), the rest are kept whatever the bad rows are. A row kept
becomes: url (the image's), caption (the turns' text, for the tokenizer and the language filter), `id`, and
`conversations`: the turns as JSON, roles named human / gpt, the <image> marker taken out (a row has one
image, and it comes before the first turn).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa

from mmcore.data.config import SourceConfig

IMAGE_MARK = "<image>"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
IMAGES_SCHEME = "images"
"""The URL scheme of an image under source.images: `images:<relative path, percent-encoded>`."""


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_records(path: Path) -> list[tuple[dict | None, str | None]]:
    """The file's rows in order: (the record, None), or (None, why it is not one) for a JSON line that does
    not parse. A JSON array that does not parse, or a file of no conversations at all, is one error."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")  # bad bytes reject their row, later
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON at line {err.lineno} column {err.colno} ({err.msg}); a "
                             "conversation file is a JSON array or JSON lines of LLaVA-format rows") from None
        rows = [(record, None) for record in records]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), None))
            except json.JSONDecodeError as err:
                rows.append((None, f"line {number}: not valid JSON ({err.msg})"))
    if not any(isinstance(record, dict) and "conversations" in record for record, _ in rows):
        raise ValueError(f"{path}: no row has a 'conversations' list; expected LLaVA's format, a JSON array or "
                         'JSON lines of {"id", "image", "conversations": [{"from": "human", "value": ...}, ...]}')
    return rows


def checked_row(record, cfg: SourceConfig, seen: set[str]) -> dict:
    """One record as the row ingest keeps (url, caption, id, conversations), or Rejected with its reason."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise Rejected("bad_conversation", "not an object with a 'conversations' list")
    if not isinstance(record.get("id"), (str, int)) or isinstance(record["id"], bool) or str(record["id"]) == "":
        raise Rejected("bad_conversation", "no id (a string or a number)")
    row_id = _utf8(str(record["id"]), "the id")
    if row_id in seen:
        raise Rejected("duplicate_id", f"id {row_id!r} appeared on an earlier row")
    seen.add(row_id)
    turns = _turns(record["conversations"], cfg.max_conversation_chars)
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise Rejected("bad_conversation", f"image is a {type(image).__name__}, not one image's URL or path")
    marks = [i for i, turn in enumerate(turns) if IMAGE_MARK in turn["value"]]
    if not image:
        raise Rejected("image_token" if marks else "no_image",
                       "<image> in a row that names no image" if marks else
                       "no image (text-only conversations are not kept: every row of a dataset is an image and text)")
    if marks != [0] or turns[0]["value"].count(IMAGE_MARK) != 1:
        raise Rejected("image_token", "the first human turn must hold <image> once, and no other turn"
                       if marks else "no <image> in a row that names an image")
    turns = [{**t, "value": t["value"].replace(IMAGE_MARK, "").strip()} for t in turns]
    if not turns[0]["value"]:
        raise Rejected("empty_turn", "turn 0 holds nothing but <image>")
    return {"url": _image_url(_utf8(image, "the image"), cfg), "id": row_id,
            "caption": "\n".join(turn["value"] for turn in turns), "conversations": json.dumps(turns)}


def _turns(conversation: list, max_chars: int) -> list[dict]:
    turns, size = [], 0
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Rejected("bad_conversation", f"turn {index} is not an object with a text 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise Rejected("bad_roles", f"turn {index} is from {turn.get('from')!r}; known: {', '.join(ROLES)}")
        if role != ("human", "gpt")[index % 2]:
            raise Rejected("bad_roles", f"turn {index} is {role}'s; turns alternate, human first")
        value = _utf8(turn["value"], f"turn {index}")
        if not value.strip():
            raise Rejected("empty_turn", f"turn {index} is empty")
        size += len(value)
        turns.append({"from": role, "value": value, **_question_type(turn, role, index)})
    if not turns or turns[-1]["from"] != "gpt":
        raise Rejected("bad_roles", "no turns" if not turns else "the last human turn has no answer")
    if size > max_chars:
        raise Rejected("conversation_too_long", f"{size} characters > source.max_conversation_chars {max_chars}")
    return turns


def _question_type(turn: dict, role: str, index: int) -> dict:
    """A human turn's `type`, kept when it names one (a short word or two: the vqa suite's per-type score)."""
    kind = turn.get("type")
    if kind is None:
        return {}
    if role != "human" or not isinstance(kind, str) or not 0 < len(kind.strip()) <= 32:
        raise Rejected("bad_conversation", f"turn {index}'s type {kind!r} is not a question type (a human turn's "
                       "name for its question, 1 to 32 characters)")
    return {"type": _utf8(kind.strip(), f"turn {index}'s type")}


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise Rejected("text_not_utf8", f"{what} is not valid UTF-8 (byte {err.start})") from None
    return text


def _image_url(image: str, cfg: SourceConfig) -> str:
    """A URL as it is (the guard checks it); a path as `images:<path>` once it is known to stay under
    source.images (the guard's handler checks again where links lead when it reads the file)."""
    if "://" in image:
        return image
    if not cfg.images:
        raise ValueError(f"{cfg.path}: image {image!r} is a path; give the directory it is relative to "
                         "(--images ROOT, source.images)")
    relative = posixpath.normpath(image)
    if posixpath.isabs(image) or relative == ".." or relative.startswith("../"):
        raise Rejected("path_outside_root", f"{image!r} leaves {cfg.images}")
    return f"{IMAGES_SCHEME}:{quote(relative)}"


def stored_turns(text: str) -> list[tuple[str, str, str]]:
    """The (question, answer, question type or "") triples of a `conversations` cell, as checked_row stored
    them."""
    turns = json.loads(text)
    return [(turns[i]["value"], turns[i + 1]["value"], turns[i].get("type", "")) for i in range(0, len(turns) - 1, 2)]


def read_conversations(path: Path, cfg: SourceConfig) -> tuple[pa.Table, list[tuple[int, str, str]]]:
    """The file's rows (row, url, caption, id, conversations; nulls where a row was rejected) and the rejected
    ones as (row, reason, detail)."""
    columns = {name: [] for name in ("url", "caption", "id", "conversations")}
    rejected, seen = [], set()
    for row, (record, error) in enumerate(read_records(path)):
        try:
            if error:
                raise Rejected("malformed_json", error)
            kept = checked_row(record, cfg, seen)
        except Rejected as why:
            rejected.append((row, why.reason, why.detail))
            kept = {}
        for name, values in columns.items():
            values.append(kept.get(name))
    table = pa.table({"row": pa.array(range(len(columns["url"])), pa.int64()),
                      **{name: pa.array(values, pa.string()) for name, values in columns.items()}})
    return table, rejected
