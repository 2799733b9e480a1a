"""Instruction data through ingest: a LLaVA-format conversation file with a planted bad row for every reason,
images from a loopback server and from a local directory, and the hand-written conversations about the
sample corpus's real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmcore.data.config import DownloadConfig, GuardConfig, IngestConfig, SourceConfig
from mmcore.data.ingest import ingest
from tests.conftest import jpeg_bytes
from tests.integration.conftest import PHOTO_CONVERSATIONS

pytestmark = pytest.mark.integration

def _chat(*turns: str, image: bool = True) -> list[dict]:
    """Turns alternating human, gpt; <image> before the first when `image`."""
    return [{"from": ("human", "gpt")[i % 2], "value": ("<image>\n" + t) if i == 0 and image else t}
            for i, t in enumerate(turns)]


def _config(path: Path, out: Path, images: Path | None, **source) -> IngestConfig:
    return IngestConfig(
        source=SourceConfig(path=str(path), kind="instructions", images=str(images) if images else None, **source),
        out=str(out), rows_per_shard=64,
        guard=GuardConfig(allow_networks=["127.0.0.1/32"], max_bytes=250_000, deadline_s=2.0),
        download=DownloadConfig(timeout_s=1.0, retries=0, threads=8, samples_per_shard=50))


@pytest.fixture(scope="module")
def hostile(served_dir, tmp_path_factory):
    """(file, images root, {id or row: the reason it must be rejected for, None: kept})."""
    server, served = served_dir
    (served / "conversations").mkdir()
    (served / "conversations" / "web.jpg").write_bytes(jpeg_bytes(color=(20, 160, 40)))
    tmp = tmp_path_factory.mktemp("conversations")
    root = tmp / "images"
    (root / "coco").mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 30, 200), (200, 200, 30)]):
        (root / "coco" / f"{i}.jpg").write_bytes(jpeg_bytes(color=color))
    (root / "coco" / "notes.jpg").write_text("not an image at all")
    (tmp / "secret.jpg").write_bytes(jpeg_bytes())
    os.symlink(tmp / "secret.jpg", root / "coco" / "link-out.jpg")
    web = f"{server.url}/conversations/web.jpg"
    good = {
        "red": ("coco/0.jpg", _chat("What colour is the square?", "Red.", "How many squares?", "One.")),
        "red-again": ("coco/0.jpg", _chat("Describe the picture.", "A red square on a plain background.")),
        "blue": ("coco/1.jpg", _chat("Which colour dominates the picture?", "Blue, all over it.")),
        "yellow-end": ("coco/2.jpg", [{"from": "user", "value": "What colour is this image?\n<image>"},
                                      {"from": "assistant", "value": "It is yellow."}]),
        "web": (web, _chat("What colour is the picture?", "Green, a plain green picture.")),
    }
    bad = {
        "dup": ("coco/1.jpg", _chat("What colour is it?", "Blue."), "duplicate_id"),  # same id as "blue"
        "roles": ("coco/1.jpg", [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "<image>\nHi"}],
                  "bad_roles"),
        "system": ("coco/1.jpg", [{"from": "system", "value": "Be brief."}, *_chat("Colour?", "Blue.")],
                   "bad_roles"),
        "unanswered": ("coco/1.jpg", _chat("What colour is it?", "Blue.", "And the shape?"), "bad_roles"),
        "empty": ("coco/1.jpg", _chat("What colour is it?", "   "), "empty_turn"),
        "long": ("coco/1.jpg", _chat("Describe it.", "blue " * 400), "conversation_too_long"),
        "text-only": ("", _chat("What is two and two?", "Four.", image=False), "no_image"),
        "two-images": (["coco/0.jpg", "coco/1.jpg"], _chat("Which is red?", "The first."), "bad_conversation"),
        "bad-type": ("coco/1.jpg", [{"from": "human", "value": "<image>\nColour?", "type": 7},
                                    {"from": "gpt", "value": "Blue."}], "bad_conversation"),
        "no-mark": ("coco/1.jpg", _chat("What colour is it?", "Blue.", image=False), "image_token"),
        "mark-no-image": ("", _chat("What colour is it?", "Blue."), "image_token"),
        "mark-later": ("coco/1.jpg", _chat("Colour?", "Blue.", "<image> and this?", "Blue."), "image_token"),
        "up": ("../secret.jpg", _chat("What is it?", "A secret."), "path_outside_root"),
        "absolute": ("/etc/hostname", _chat("What is it?", "A file."), "path_outside_root"),
        "link-out": ("coco/link-out.jpg", _chat("What is it?", "A secret."), "path_outside_root"),
        "missing": ("coco/nowhere.jpg", _chat("What is it?", "Nothing."), "image_not_found"),
        "not-image": ("coco/notes.jpg", _chat("What is it?", "Text."), "not_an_image"),
        "http-404": (f"{server.url}/conversations/absent.jpg", _chat("What is it?", "Nothing."), "http_error"),
        "french": ("coco/2.jpg", _chat("De quelle couleur est cette image ?", "Elle est entièrement jaune, "
                                        "comme un citron bien mûr."), "language"),
    }
    lines = [json.dumps({"id": i, "image": image, "conversations": chat}) for i, (image, chat) in good.items()]
    lines += [json.dumps({"id": "blue" if i == "dup" else i, "image": image, "conversations": chat})
              for i, (image, chat, _) in bad.items()]
    expected = {i: None for i in good} | {i: reason for i, (_, _, reason) in bad.items()}
    lines.append('{"id": "broken", "image": "coco/0.jpg", "conversations": [')  # cut short
    lines.append(json.dumps({"image": "coco/0.jpg", "conversations": _chat("Colour?", "Red.")}))  # no id
    lines.append(json.dumps(["not", "an", "object"]))
    positional = {len(lines) - 3: "malformed_json", len(lines) - 2: "bad_conversation",
                  len(lines) - 1: "bad_conversation"}
    raw = [line.encode() for line in lines]
    raw.append(json.dumps({"id": "latin1", "image": "coco/0.jpg", "conversations": _chat("Caf\u00e9?", "Oui.")})
               .replace("\\u00e9", "\xe9").encode("latin-1"))  # a byte that is not UTF-8
    positional[len(raw) - 1] = "text_not_utf8"
    path = tmp / "conversations.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path, root, expected, positional


@pytest.fixture(scope="module")
def version(hostile, tmp_path_factory):
    path, root, _, _ = hostile
    return ingest(_config(path, tmp_path_factory.mktemp("out") / "v1", root, max_conversation_chars=1000))


def test_every_bad_row_is_rejected_for_its_reason_and_the_counts_add_up(version, hostile):
    path, _, expected, positional = hostile
    rows = version.manifest["rows"]
    lines = path.read_bytes().splitlines()
    assert rows["in"] == len(lines) == rows["kept"] + sum(rows["rejected"].values())
    rejects = pq.read_table(version.path / "rejects.parquet").to_pylist()
    by_row = {r["row"]: r["reason"] for r in rejects}
    ids = [json.loads(line).get("id") if row not in positional else None for row, line in enumerate(lines)]
    for row, reason in positional.items():
        assert by_row.get(row) == reason, (row, lines[row][:60])
    for row, row_id in enumerate(ids):
        if row_id is not None:
            want = "duplicate_id" if row_id == "blue" and row > ids.index("blue") else expected[row_id]
            assert by_row.get(row) == want, (row_id, [r for r in rejects if r["row"] == row])
    assert version.manifest["rows"]["rejected"] == {reason: list(by_row.values()).count(reason)
                                                    for reason in set(by_row.values())}


def test_kept_conversations_hold_their_turns_and_share_their_images_split(version, hostile):
    _, _, expected, _ = hostile
    assert version.kind == "instructions"
    kept = [r for split in ("train", "val", "test") if version.shard_paths(split)
            for r in version.read(split, ["key", "url", "caption", "split", "id", "conversations"]).to_pylist()]
    assert sorted(r["id"] for r in kept) == sorted(i for i, reason in expected.items() if reason is None)
    assert len({r["key"] for r in kept}) == len(kept), "two conversations about one image keep their own keys"
    red = {r["id"]: r for r in kept if r["id"].startswith("red")}
    assert red["red"]["split"] == red["red-again"]["split"] and red["red"]["url"] == red["red-again"]["url"]
    turns = json.loads(red["red"]["conversations"])
    assert turns == [{"from": "human", "value": "What colour is the square?"}, {"from": "gpt", "value": "Red."},
                     {"from": "human", "value": "How many squares?"}, {"from": "gpt", "value": "One."}]
    ending = json.loads(next(r for r in kept if r["id"] == "yellow-end")["conversations"])
    assert ending[0] == {"from": "human", "value": "What colour is this image?"} and ending[1]["from"] == "gpt"
    assert all("<image>" not in r["caption"] and "<image>" not in r["conversations"] for r in kept)


def test_a_file_of_no_conversations_or_paths_without_a_root_fail_before_anything(hostile, tmp_path):
    path, _, _, _ = hostile
    wrong = tmp_path / "urls.json"
    wrong.write_text(json.dumps([{"url": "http://example.com/a.jpg", "caption": "a cat"}]))
    with pytest.raises(ValueError, match=r"urls.json: no row has a 'conversations' list; expected LLaVA's format"):
        ingest(_config(wrong, tmp_path / "a", None))
    with pytest.raises(ValueError, match=r"image 'coco/0.jpg' is a path; give the directory it is relative to "
                                         r"\(--images ROOT"):
        ingest(_config(path, tmp_path / "b", None))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_hand_written_conversations_about_the_sample_photos_ingest_from_their_directory(photo_conversations):
    """The real-photo check's data: scikit-image's and scikit-learn's photos and LFW faces, as the sample corpus
    ships them, with the conversations in tests/data (images by relative path, one JSON array)."""
    written = json.loads(PHOTO_CONVERSATIONS.read_text())
    assert photo_conversations.manifest["rows"] == {"in": len(written), "kept": len(written), "rejected": {}}
    kept = [r for path in photo_conversations.shard_paths() for r in pq.read_table(path).to_pylist()]
    assert {r["split"] for r in kept} == {"train", "val", "test"}
    coffee = next(r for r in kept if r["id"] == "coffee-0")
    assert coffee["url"] == "images:photos/coffee.jpg" and coffee["width"] == coffee["height"] == 64
    assert json.loads(coffee["conversations"])[1] == {"from": "gpt", "value": "A cup of coffee."}


def test_the_data_card_shows_turns_answer_lengths_languages_and_reject_shares(version):
    card = version.manifest["card"]
    assert card["kind"] == "instructions"
    assert card["turns_per_conversation"] == {"min": 1, "median": 1, "p90": 2, "max": 2}  # red: 2, four: 1
    assert (card["words_per_answer"]["min"], card["words_per_answer"]["max"]) == (1, 7)
    assert card["languages"]["fr"] == 1 and sum(card["languages"].values()) == 6, "each row downloaded, judged"
    cli = Path(sys.executable).with_name("mmpipe")
    shown = subprocess.run([str(cli), "dataset", "show", str(version.path)], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, COLUMNS="400"))  # no line wrapped in a cell
    assert shown.returncode == 0, shown.stderr
    out = " ".join(shown.stdout.split())
    rows = version.manifest["rows"]
    assert "kind │ instructions" in out and "turns per conversation │ min 1, median 1, p90 2, max 2" in out
    assert f"bad_roles {rows['rejected']['bad_roles']} ({rows['rejected']['bad_roles'] / rows['in']:.1%})" in out
