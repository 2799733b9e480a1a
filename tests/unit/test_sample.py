"""The sample corpus: deterministic, captions true to the scenes, defects labelled."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow.parquet as pq

from mmcore.data.reasons import REASONS
from mmcore.data.synthetic.corpus import COLORS, SCENE_TEMPLATES, SampleSpec, describe, make_sample, synthetic_scene


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    spec = SampleSpec(synthetic=60, digits=20, photos=False)
    make_sample(tmp_path / "a", "http://127.0.0.1:9", spec)
    make_sample(tmp_path / "b", "http://127.0.0.1:9", spec)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    make_sample(tmp_path / "c", "http://127.0.0.1:9", SampleSpec(synthetic=60, digits=20, photos=False, seed=5))
    assert _files(tmp_path / "c") != _files(tmp_path / "a")


def test_rows_point_at_files_and_defects_name_real_reasons(tmp_path):
    url_list = make_sample(tmp_path, "http://127.0.0.1:9", SampleSpec(synthetic=60, digits=30))
    rows = pq.read_table(url_list).to_pylist()
    kinds = collections.Counter(r["source"] for r in rows)
    assert kinds["synthetic"] == 60 and kinds["sklearn-digits"] == 30 and kinds["photo"] == 20 and kinds["lfw"] == 200
    assert {r["defect"] for r in rows if r["defect"]} <= set(REASONS)
    for row in rows:
        if row["defect"] is None:
            path = tmp_path / row["url"].split("http://127.0.0.1:9/", 1)[1]
            assert path.exists(), row["url"]
    digits = [r for r in rows if r["source"] == "sklearn-digits"]
    assert all(r["caption_kind"] == "templated" and r["label"].isdigit() for r in digits)


def test_scene_colours_are_where_the_caption_says():
    """For 'X left of Y' scenes, X's colour dominates the left half and Y's the right half."""
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(200):
        image, attrs = synthetic_scene(rng, 128)
        if attrs.get("relation") != "left of":
            continue
        pixels = np.asarray(image).astype(int)
        def share(color, region):
            return (np.abs(region - np.array(COLORS[color])).sum(-1) < 40).mean()
        left, right = pixels[:, :64], pixels[:, 64:]
        assert share(attrs["color"], left) > share(attrs["color"], right)
        assert share(attrs["color2"], right) > share(attrs["color2"], left)
        assert attrs["caption"] in {t.format(describe(attrs)) for t in SCENE_TEMPLATES}
        checked += 1
    assert checked > 10


def test_a_group_of_n_shapes_shows_n_separate_shapes():
    """'three red circles' must be three blobs of red, not two touching ones that read as one."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    for _ in range(60):
        image, attrs = synthetic_scene(rng, 128)
        pixels = np.asarray(image).astype(int)
        mask = np.abs(pixels - np.array(COLORS[attrs["color"]])).sum(-1) < 60
        if attrs.get("relation") is not None:  # the second group may share the first's colour family
            continue
        assert ndimage.label(mask)[1] == attrs["count"], attrs["caption"]


def test_the_corpus_writes_its_questions_as_conversations_a_reader_keeps_whole(tmp_path):
    """conversations.jsonl: per clean image, two conversations of every question type it answers, in training's
    seen wordings (never a held-out one), its image by the URL list's URL; each passes the ingest's checks."""
    import json

    from mmcore.data.config import SourceConfig
    from mmcore.data.conversations import read_conversations, stored_turns
    from mmcore.data.synthetic.questions import WORDINGS, _question, questions

    url_list = make_sample(tmp_path, "http://127.0.0.1:9", SampleSpec(synthetic=60, digits=20))
    rows = {r["url"]: r for r in pq.read_table(url_list).to_pylist() if not r["defect"]}
    written = [json.loads(line) for line in (tmp_path / "conversations.jsonl").read_text().splitlines()]
    assert collections.Counter(w["image"] for w in written) == {url: 2 for url in rows}
    for conversation in written:
        row, turns = rows[conversation["image"]], conversation["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and [t["from"] for t in turns] == ["human", "gpt"] * (
            len(turns) // 2)
        kinds = [q.kind for q in questions(dict(row, key="k"))]
        assert len(turns) // 2 == len(kinds), "every question type the row answers"
        assert sorted(t["type"] for t in turns[::2]) == sorted(kinds), "each question names its type"
        held_out = {_question(kind, template, row, truth).question for kind in kinds
                    for template in WORDINGS[kind][1] for truth in (True, False)}
        assert {q.question for q in questions(dict(row, key="k"), held_out=True)} <= held_out
        assert not [t["value"] for t in turns[::2] if any(h in t["value"] for h in held_out)]
        assert row["caption"] in [t["value"] for t in turns[1::2]], "the caption request is one of them"
    table, rejected = read_conversations(tmp_path / "conversations.jsonl", SourceConfig(
        path=str(tmp_path / "conversations.jsonl"), kind="instructions"))
    assert rejected == [] and table.num_rows == len(written)
    stored = [kind for cell in table.column("conversations").to_pylist() for _, _, kind in stored_turns(cell)]
    assert "" not in stored and {"caption", "colour", "digit"} <= set(stored), "ingest keeps each question's type"


def test_noise_gives_a_share_of_the_clean_rows_wrong_captions_and_leaves_the_rest_as_it_was(tmp_path):
    """`sample make --noise F`: F of the clean rows get another row's caption or page boilerplate; images, URLs,
    attribute columns and every other row are the noise-free corpus's."""
    from mmcore.data.synthetic.corpus import OFF_TOPIC

    spec = SampleSpec(synthetic=100, digits=40, photos=False, conversations=0)
    clean = pq.read_table(make_sample(tmp_path / "clean", "http://127.0.0.1:9", spec)).to_pylist()
    noisy = pq.read_table(make_sample(tmp_path / "noisy", "http://127.0.0.1:9", SampleSpec(
        **{**vars(spec), "noise": 0.3}))).to_pylist()
    assert _files(tmp_path / "clean" / "synthetic") == _files(tmp_path / "noisy" / "synthetic")
    assert len(noisy) == len(clean)
    changed = [(c, n) for c, n in zip(clean, noisy) if c != n]
    candidates = sum(1 for row in clean if not row["defect"])
    assert len(changed) == round(0.3 * candidates)
    kinds = collections.Counter(n["caption_kind"] for _, n in changed)
    assert abs(kinds["swapped"] - kinds["off-topic"]) <= 1 and sum(kinds.values()) == len(changed)
    captions = {row["caption"] for row in clean}
    for c, n in changed:
        assert {k: v for k, v in c.items() if k not in ("caption", "caption_kind")} == \
            {k: v for k, v in n.items() if k not in ("caption", "caption_kind")}
        assert not c["defect"] and (n["caption"] in captions if n["caption_kind"] == "swapped"
                                    else n["caption"] in OFF_TOPIC)
    swapped = [(c["caption"], n["caption"]) for c, n in changed if n["caption_kind"] == "swapped"]
    assert sum(a != b for a, b in swapped) >= len(swapped) - 2, "a swapped row holds another row's caption"
