"""Ingest's typed configs, one dataclass per concern, nested into IngestConfig; validated at the edge."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mmcore.config import check

SOURCE_FORMATS = ("parquet", "csv", "jsonl")
SOURCE_KINDS = ("captions", "instructions")
RESIZE_MODES = ("border", "keep_ratio", "center_crop", "keep_ratio_largest", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")



@dataclass
class SourceConfig:
    """Where the URL list (or the conversation file) is and which of its columns to use."""

    path: str
    """The URL list: a .parquet, .csv or .jsonl file (or a directory of one format); with kind instructions,
    a LLaVA-format conversation file (a JSON array or JSON lines; or a directory of them)."""
    kind: str = "captions"
    """captions: image-text pairs (url_col, caption_col); instructions: conversations about images
    (data/conversations.py)."""
    images: str | None = None
    """kind instructions: the directory (or s3://bucket/prefix) that image paths in the file are relative to
    (URLs need none)."""
    max_conversation_chars: int = 8192
    """kind instructions: a conversation with more characters of text than this is rejected."""
    format: str | None = None
    """One of parquet / csv / jsonl; None infers it from the file extension."""
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    extra_cols: list[str] | None = None
    """Columns carried through to the dataset; None carries every other column."""

    def validate(self) -> None:
        check(bool(self.path), "source.path", "is empty")
        check(self.format in (None, *SOURCE_FORMATS), "source.format",
               f"{self.format!r} is not one of {SOURCE_FORMATS}")
        check(self.url_col != self.caption_col, "source.caption_col", "must differ from url_col")
        check(self.kind in SOURCE_KINDS, "source.kind", f"{self.kind!r} is not one of {SOURCE_KINDS}")
        check(self.kind == "instructions" or not self.images, "source.images",
              "is for image paths in a conversation file (source.kind=instructions)")
        check(self.max_conversation_chars >= 1, "source.max_conversation_chars", "must be at least 1")


@dataclass
class GuardConfig:
    """What the fetcher may reach and how much it may read (anything from the web is untrusted)."""

    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    """URL schemes that may be fetched; file://, ftp:// and data: are never fetched."""
    allow_networks: list[str] = field(default_factory=list)
    """CIDRs exempt from private-address blocking, e.g. 127.0.0.1/32 for a loopback server."""
    max_bytes: int = 16 * 1024 * 1024
    """Largest response body read, in bytes; a larger one is refused."""
    max_pixels: int = 40_000_000
    """Largest width x height an image header may declare (decompression-bomb guard)."""
    deadline_s: float = 30.0
    """Wall-clock limit for reading one response body, in seconds (slow-drip guard)."""
    max_redirects: int = 5
    """Redirect hops followed; each hop is checked like the first URL."""

    def validate(self) -> None:
        bad = [s for s in self.allowed_schemes if s not in ("http", "https")]
        check(not bad, "guard.allowed_schemes", f"only http and https can be fetched, got {bad}")
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as err:
                raise ValueError(f"guard.allow_networks: {cidr!r} is not a CIDR ({err})") from None
        check(self.max_bytes > 0, "guard.max_bytes", "must be positive")
        check(self.max_pixels > 0, "guard.max_pixels", "must be positive")
        check(self.deadline_s > 0, "guard.deadline_s", "must be positive")
        check(0 <= self.max_redirects <= 20, "guard.max_redirects", "must be in [0, 20]")


@dataclass
class DownloadConfig:
    """How img2dataset downloads and resizes (its own options, named as in its docs)."""

    image_size: int = 64
    """Side of the stored image in pixels after resizing."""
    resize_mode: str = "border"
    """img2dataset resize mode: border pads to a square, keep_ratio keeps the aspect ratio, no keeps the original."""
    encode_format: str = "jpg"
    """Format of the stored image bytes."""
    encode_quality: int = 95
    """JPEG/WebP quality (PNG: compression level 0-9)."""
    min_image_size: int = 8
    """Images whose shorter side is smaller than this are rejected (image_too_small)."""
    max_aspect_ratio: float = 3.0
    """Images whose long/short side ratio is larger are rejected (aspect_ratio)."""
    processes: int = 2
    """Download processes."""
    threads: int = 32
    """Download threads per process."""
    timeout_s: float = 10.0
    """Socket timeout of one request, in seconds."""
    retries: int = 1
    """Extra attempts after a failed download."""
    samples_per_shard: int = 1000
    """Rows per img2dataset shard; shards are the unit of parallelism and of resume."""
    user_agent_token: str = "mmpipe"
    """Token sent in the User-Agent and matched against X-Robots-Tag directives."""
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    """X-Robots-Tag directives that opt an image out; they are honoured."""

    def validate(self) -> None:
        check(self.image_size >= 8, "download.image_size", "must be at least 8")
        check(self.resize_mode in RESIZE_MODES, "download.resize_mode",
               f"{self.resize_mode!r} is not one of {RESIZE_MODES}")
        check(self.encode_format in ENCODE_FORMATS, "download.encode_format",
               f"{self.encode_format!r} is not one of {ENCODE_FORMATS}")
        check(self.processes >= 1, "download.processes", "must be at least 1")
        check(self.threads >= 1, "download.threads", "must be at least 1")
        check(self.timeout_s > 0, "download.timeout_s", "must be positive")
        check(self.retries >= 0, "download.retries", "must be >= 0")
        check(self.samples_per_shard >= 1, "download.samples_per_shard", "must be at least 1")
        check(self.max_aspect_ratio >= 1, "download.max_aspect_ratio", "must be >= 1")


@dataclass
class FilterConfig:
    """Filters applied after download; each rejected row is counted under one reason."""

    caption_min_words: int = 2
    """Captions with fewer words are rejected (caption_too_short)."""
    caption_max_chars: int = 512
    """Captions with more characters are rejected (caption_too_long)."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep; empty disables the language filter."""
    language_candidates: list[str] = field(default_factory=lambda: [
        "en", "fr", "de", "es", "it", "pt", "nl", "ru", "zh", "ja",
        "ko", "ar", "hi", "tr", "pl", "sv", "id", "vi"])
    """Languages the detector chooses among (a short list keeps memory near 0.4 GB)."""
    language_min_confidence: float = 0.1
    """A caption is kept when the detector gives the target languages at least this confidence."""
    exact_dedup: bool = True
    """Drop rows whose stored image bytes equal an earlier row's (same sha256)."""
    near_dup_max_distance: int = 4
    """Perceptual-hash Hamming distance (of 64 bits) at or below which images are near duplicates; -1 disables."""
    model_score_uri: str = ""
    """A registered contrastive model (models:/name@alias) scoring image-caption agreement; empty disables."""
    model_score_threshold: float | None = None
    """Keep pairs whose cosine similarity is at least this (DataComp "CLIP score" filtering)."""
    model_score_top_fraction: float | None = None
    """Or keep this fraction of best-scoring pairs (within each chunk of download.samples_per_shard rows)."""

    def validate(self) -> None:
        check(self.caption_min_words >= 0, "filters.caption_min_words", "must be >= 0")
        check(self.caption_max_chars >= 1, "filters.caption_max_chars", "must be >= 1")
        check(0 <= self.language_min_confidence <= 1, "filters.language_min_confidence", "must be in [0, 1]")
        missing = [code for code in self.languages if code not in self.language_candidates]
        check(not missing, "filters.languages", f"{missing} must also be in language_candidates")
        check(-1 <= self.near_dup_max_distance <= 32, "filters.near_dup_max_distance", "must be in [-1, 32]")
        if self.model_score_uri:
            check((self.model_score_threshold is None) != (self.model_score_top_fraction is None),
                   "filters.model_score_threshold", "set exactly one of model_score_threshold / _top_fraction")
            check(self.model_score_top_fraction is None or 0 < self.model_score_top_fraction <= 1,
                   "filters.model_score_top_fraction", "must be in (0, 1]")


@dataclass
class SplitConfig:
    """Deterministic train/val/test assignment by a hash of the row key."""

    val_fraction: float = 0.1
    """Share of rows in the val split."""
    test_fraction: float = 0.1
    """Share of rows in the test split."""
    salt: str = "mmpipe"
    """Mixed into the hash; change it to draw a different split."""

    def validate(self) -> None:
        check(0 <= self.val_fraction < 1, "split.val_fraction", "must be in [0, 1)")
        check(0 <= self.test_fraction < 1, "split.test_fraction", "must be in [0, 1)")
        check(self.val_fraction + self.test_fraction < 1, "split", "val + test fractions must leave rows for train")


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the train split's captions (HF tokenizers)."""

    vocab_size: int = 4096
    """Upper bound on the vocabulary; a small corpus yields fewer tokens."""
    min_frequency: int = 2
    """A merge must occur this often to be learned."""

    def validate(self) -> None:
        check(self.vocab_size >= 300, "tokenizer.vocab_size", "must be >= 300 (256 bytes + special tokens)")
        check(self.min_frequency >= 1, "tokenizer.min_frequency", "must be >= 1")


@dataclass
class IngestConfig:
    """Everything `ingest` needs to turn a URL list into a dataset version."""

    source: SourceConfig
    """The URL list."""
    out: str
    """Directory of the dataset version to create; it must not exist yet."""
    work_dir: str | None = None
    """Downloads and staging live here until the version is complete; default `<out>.partial`.
    A re-run with the same work_dir resumes finished download shards."""
    rows_per_shard: int = 1024
    """Rows per curated Parquet shard."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self) -> None:
        check(bool(self.out), "out", "is empty")
        check(self.rows_per_shard >= 1, "rows_per_shard", "must be at least 1")
        for part in (self.source, self.guard, self.download, self.filters, self.split, self.tokenizer):
            part.validate()
