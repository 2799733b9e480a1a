"""Filters after download: a chain that sees kept rows chunk by chunk, in source-row order.

A filter is any callable `(rows: pa.Table) -> list[None | (reason, detail)]`: per row, None
keeps it, a pair rejects it under `reason` (reasons.REASONS). Rows reach a filter only if
every earlier filter kept them; stateful filters (dedup) keep the first occurrence.
`rows` has the columns row, url, caption, image, width, height, sha256 and the extras.
The model-score filter (filters.model_score_uri: a registered contrastive model) runs last;
`ingest(..., extra_filters=[...])` appends any other callable after it.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from mmcore.data.config import FilterConfig
from mmcore.data.source import Rejects

Verdict = tuple[str, str] | None
Filter = Callable[[pa.Table], list[Verdict]]


class CaptionFilter:
    """Too few words or too many characters."""

    def __init__(self, min_words: int, max_chars: int):
        self.min_words, self.max_chars = min_words, max_chars

    def __call__(self, rows: pa.Table) -> list[Verdict]:
        return [self._check(caption) for caption in rows.column("caption").to_pylist()]

    def _check(self, caption: str) -> Verdict:
        if len(caption) > self.max_chars:
            return "caption_too_long", f"{len(caption)} characters > {self.max_chars}"
        words = len(caption.split())
        if words < self.min_words:
            return "caption_too_short", f"{words} word(s) < {self.min_words}"
        return None


class LanguageFilter:
    """Keeps captions the detector gives the target languages enough confidence for (lingua)."""

    def __init__(self, languages: Sequence[str], candidates: Sequence[str], min_confidence: float):
        self.languages = {code.lower() for code in languages}
        self.candidates = [code.lower() for code in candidates]
        self.min_confidence = min_confidence
        self._detector = None
        self.detected: Counter[str] = Counter()
        """The most likely language of every row judged (the data card's language mix)."""

    def _build(self):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        try:
            codes = [getattr(IsoCode639_1, code.upper()) for code in self.candidates]
        except AttributeError as err:
            raise ValueError(f"filters.language_candidates: unknown ISO 639-1 code ({err})") from None
        return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()

    def __call__(self, rows: pa.Table) -> list[Verdict]:
        self._detector = self._detector or self._build()
        captions = rows.column("caption").to_pylist()
        results = self._detector.compute_language_confidence_values_in_parallel(captions)
        return [self._verdict(values) for values in results]

    def _verdict(self, values) -> Verdict:
        self.detected[values[0].language.iso_code_639_1.name.lower() if values else "unknown"] += 1
        target = sum(v.value for v in values if v.language.iso_code_639_1.name.lower() in self.languages)
        if target >= self.min_confidence:
            return None
        top = values[0] if values else None
        found = f"{top.language.iso_code_639_1.name.lower()} ({top.value:.2f})" if top else "nothing"
        return "language", f"detected {found}; {sorted(self.languages)} {target:.2f} < {self.min_confidence}"


class ExactDuplicateFilter:
    """Stored image bytes identical to an earlier row's (sha256)."""

    def __init__(self):
        self.seen: dict[str, int] = {}

    def __call__(self, rows: pa.Table) -> list[Verdict]:
        out = []
        for row, digest in zip(rows.column("row").to_pylist(), rows.column("sha256").to_pylist()):
            if digest in self.seen:
                out.append(("exact_duplicate", f"same image bytes as row {self.seen[digest]}"))
            else:
                self.seen[digest] = row
                out.append(None)
        return out


def phash64(image_bytes: bytes) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of an encoded image."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        bits = imagehash.phash(image.convert("RGB")).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class NearDuplicateFilter:
    """Perceptual hash within `max_distance` bits of an earlier row's.

    Pigeonhole index: split the 64 bits into max_distance + 1 bands; two hashes within
    max_distance bits agree exactly on at least one band, so only rows sharing a band
    value are compared (near-linear instead of all pairs).
    """

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [int(e) for e in np.linspace(0, 64, bands + 1)]
        self.masks = [(lo, ((1 << (hi - lo)) - 1) << lo) for lo, hi in zip(edges[:-1], edges[1:])]
        self.buckets: list[dict[int, list[tuple[int, int]]]] = [{} for _ in self.masks]

    def __call__(self, rows: pa.Table) -> list[Verdict]:
        out = []
        for row, image in zip(rows.column("row").to_pylist(), rows.column("image").to_pylist()):
            value = phash64(image)
            match = self._nearest(value)
            if match is not None:
                distance, other = match
                out.append(("near_duplicate", f"perceptual hash {distance} bit(s) from row {other}"))
                continue
            for (_, mask), bucket in zip(self.masks, self.buckets):
                bucket.setdefault(value & mask, []).append((value, row))
            out.append(None)
        return out

    def _nearest(self, value: int) -> tuple[int, int] | None:
        best = None
        for (_, mask), bucket in zip(self.masks, self.buckets):
            for other_value, other_row in bucket.get(value & mask, ()):
                distance = (value ^ other_value).bit_count()
                if distance <= self.max_distance and (best is None or (distance, other_row) < best):
                    best = (distance, other_row)
        return best


class ModelScoreFilter:
    """DataComp-style filtering: cosine similarity of a contrastive model's image and caption
    embeddings (Gadre et al. 2023, "DataComp"); here the model is one this pipeline trained."""

    def __init__(self, model, preprocess, threshold: float | None = None, top_fraction: float | None = None,
                 batch_size: int = 256):
        self.model, self.preprocess = model.eval(), preprocess
        self.threshold, self.top_fraction, self.batch_size = threshold, top_fraction, batch_size

    def scores(self, rows: pa.Table) -> np.ndarray:
        """Cosine similarity of each row's image and caption embeddings."""
        from mmcore.models.encode import embed_images, embed_texts

        if rows.num_rows == 0:  # a chunk the earlier filters emptied
            return np.zeros(0, np.float32)
        images = embed_images(self.model, self.preprocess, rows.column("image").to_pylist(), self.batch_size)
        texts = embed_texts(self.model, self.preprocess, rows.column("caption").to_pylist(), self.batch_size)
        return (images * texts).sum(-1)

    def __call__(self, rows: pa.Table) -> list[Verdict]:
        scores = self.scores(rows)
        keep, cut = keep_by_score(scores, self.threshold, self.top_fraction)
        return [None if k else ("model_score", f"score {s:.3f} < {cut:.3f}") for s, k in zip(scores, keep)]


def keep_by_score(scores: np.ndarray, threshold: float | None = None,
                  top_fraction: float | None = None) -> tuple[np.ndarray, float]:
    """DataComp's two rules: the rows scoring at least `threshold`, or the `top_fraction` best (ties by row
    order) -> (which to keep, the lowest score kept)."""
    if threshold is not None:
        return scores >= threshold, threshold
    kept = max(1, math.ceil(top_fraction * len(scores)))
    order = np.argsort(-scores, kind="stable")
    keep = np.zeros(len(scores), bool)
    keep[order[:kept]] = True
    return keep, float(scores[order[kept - 1]])


def build_filters(cfg: FilterConfig, kind: str = "captions") -> list[Filter]:
    """The configured chain, cheapest first. Conversations (kind instructions) pass the language filter only:
    their length is checked as they are read, several may be about one image, and a caption's score does
    not rank a conversation."""
    if kind == "instructions":
        return [LanguageFilter(cfg.languages, cfg.language_candidates, cfg.language_min_confidence)] \
            if cfg.languages else []
    chain: list[Filter] = [CaptionFilter(cfg.caption_min_words, cfg.caption_max_chars)]
    if cfg.languages:
        chain.append(LanguageFilter(cfg.languages, cfg.language_candidates, cfg.language_min_confidence))
    if cfg.exact_dedup:
        chain.append(ExactDuplicateFilter())
    if cfg.near_dup_max_distance >= 0:
        chain.append(NearDuplicateFilter(cfg.near_dup_max_distance))
    if cfg.model_score_uri:
        from mmcore.registry import load_model

        model, preprocess = load_model(cfg.model_score_uri)
        chain.append(ModelScoreFilter(model, preprocess, cfg.model_score_threshold, cfg.model_score_top_fraction))
    return chain


def run_filters(chunks: Iterable[pa.Table], chain: Sequence[Filter], rejects: Rejects) -> Iterator[pa.Table]:
    """Apply the chain to each chunk; rejected rows go to `rejects`, kept rows are yielded."""
    for chunk in chunks:
        for flt in chain:
            if chunk.num_rows == 0:
                break
            verdicts = flt(chunk)
            keep = []
            for index, (row, verdict) in enumerate(zip(chunk.column("row").to_pylist(), verdicts, strict=True)):
                if verdict is None:
                    keep.append(index)
                else:
                    rejects.add(row, *verdict)
            chunk = chunk.take(pa.array(keep, pa.int64()))  # an empty list would be a null-typed array
        yield chunk
