"""Filters: captions, language, exact and near duplicates; the chain's bookkeeping."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mmcore.data.config import FilterConfig
from mmcore.data.filters import (CaptionFilter, ExactDuplicateFilter, LanguageFilter, NearDuplicateFilter,
                                 build_filters, phash64, run_filters)
from mmcore.data.synthetic.corpus import synthetic_scene
from mmcore.data.source import Rejects


def _rows(captions=None, images=None, digests=None):
    n = len(captions or images or digests)
    return pa.table({"row": list(range(n)), "caption": captions or ["a b"] * n,
                     "image": images or [b""] * n, "sha256": digests or [str(i) for i in range(n)]})


def _reasons(verdicts):
    return [v[0] if v else None for v in verdicts]


def test_caption_filter():
    flt = CaptionFilter(min_words=2, max_chars=20)
    captions = ["a cat", "cat", "a very long caption that goes on", "two dogs"]
    assert _reasons(flt(_rows(captions))) == [None, "caption_too_short", "caption_too_long", None]


def test_language_filter_keeps_english_and_rejects_others():
    cfg = FilterConfig()
    flt = LanguageFilter(cfg.languages, cfg.language_candidates, cfg.language_min_confidence)
    english = ["two red circles left of a blue square", "a handwritten digit seven",
               "a cup of coffee on a saucer seen from above", "a small grayscale photo of a face"]
    foreign = ["deux cercles rouges à gauche d'un carré bleu", "zwei gelbe Dreiecke über einem grünen Quadrat",
               "un cuadrado azul debajo de un círculo naranja", "красный круг слева от синего квадрата"]
    verdicts = flt(_rows(english + foreign))
    assert _reasons(verdicts) == [None] * 4 + ["language"] * 4
    assert "detected fr" in verdicts[4][1]


def test_unknown_language_code_is_a_config_error():
    flt = LanguageFilter(["en"], ["en", "xx"], 0.1)
    with pytest.raises(ValueError, match="language_candidates"):
        flt(_rows(["a b"]))


def test_exact_duplicates_keep_the_first_across_chunks():
    flt = ExactDuplicateFilter()
    assert _reasons(flt(_rows(digests=["a", "b", "a"]))) == [None, None, "exact_duplicate"]
    later = flt(pa.table({"row": [7], "caption": ["x y"], "image": [b""], "sha256": ["b"]}))
    assert later == [("exact_duplicate", "same image bytes as row 1")]


def _jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_near_duplicates_catch_recodes_not_other_scenes():
    rng = np.random.default_rng(0)
    scenes = [synthetic_scene(rng, 128)[0] for _ in range(40)]
    images = [_jpeg(s, 90) for s in scenes] + [_jpeg(scenes[3], 50), _jpeg(scenes[7].resize((100, 100)), 80)]
    verdicts = NearDuplicateFilter(max_distance=4)(_rows(images=images))
    assert _reasons(verdicts) == [None] * 40 + ["near_duplicate"] * 2
    assert verdicts[40][1].endswith("from row 3") and verdicts[41][1].endswith("from row 7")


@pytest.mark.parametrize("max_distance", [0, 3, 4, 10])
def test_band_index_finds_what_brute_force_finds(max_distance):
    """The pigeonhole index must not miss a pair within max_distance bits."""
    rnd = random.Random(max_distance)
    hashes = [rnd.getrandbits(64) for _ in range(150)]
    hashes += [h ^ sum(1 << b for b in rnd.sample(range(64), rnd.randint(0, 12))) for h in hashes[:150]]
    flt = NearDuplicateFilter(max_distance)
    kept = []
    for index, value in enumerate(hashes):
        found = flt._nearest(value)
        expected = min(((v ^ value).bit_count(), i) for i, v in kept if (v ^ value).bit_count() <= max_distance) \
            if any((v ^ value).bit_count() <= max_distance for _, v in kept) else None
        assert (found[0] if found else None) == (expected[0] if expected else None)
        if found is None:
            for (_, mask), bucket in zip(flt.masks, flt.buckets):
                bucket.setdefault(value & mask, []).append((value, index))
            kept.append((index, value))


def test_phash_is_stable_for_the_same_pixels():
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    assert phash64(_jpeg(image, 95)) == phash64(_jpeg(image, 95))


def test_chain_counts_each_rejected_row_once_in_order():
    rejects = Rejects()
    chain = build_filters(FilterConfig(languages=[], near_dup_max_distance=-1))
    chunk = _rows(["a cat", "cat", "a cat", "a dog"], digests=["x", "y", "x", "z"])
    kept = pa.concat_tables(run_filters([chunk], chain, rejects))
    assert kept.column("row").to_pylist() == [0, 3]
    assert {r["row"]: r["reason"] for r in rejects.table().to_pylist()} == {1: "caption_too_short", 2: "exact_duplicate"}


def test_a_chunk_whose_every_row_is_rejected_yields_an_empty_chunk_and_counts_them():
    """A later chunk of copies of earlier images: the duplicate filter rejects all of it (this broke a
    100,000-row ingest of 400 images: Arrow cannot take an empty, untyped index list)."""
    rejects = Rejects()
    chain = [ExactDuplicateFilter(), CaptionFilter(min_words=2, max_chars=200)]
    first = _rows(["a red circle", "a blue square"], digests=["x", "y"])
    again = pa.table({"row": [2, 3], "caption": ["a red circle", "a blue square"], "image": [b"", b""],
                      "sha256": ["y", "x"]})
    kept = list(run_filters([first, again], chain, rejects))
    assert [chunk.num_rows for chunk in kept] == [2, 0]
    assert {r["row"]: r["reason"] for r in rejects.table().to_pylist()} == {2: "exact_duplicate", 3: "exact_duplicate"}
