"""Typed configs, one dataclass per concern, nested into RunConfig; validated at the edge."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCE_FORMATS = ("parquet", "csv", "jsonl")
RESIZE_MODES = ("border", "keep_ratio", "center_crop", "keep_ratio_largest", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")


def _check(condition: bool, name: str, message: str) -> None:
    """Raise a ValueError naming the config field when `condition` is false."""
    if not condition:
        raise ValueError(f"{name}: {message}")


@dataclass
class SourceConfig:
    """Where the URL list is and which of its columns to use."""

    path: str
    """The URL list: a .parquet, .csv or .jsonl file (or a directory of one format)."""
    format: str | None = None
    """One of parquet / csv / jsonl; None infers it from the file extension."""
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    extra_cols: list[str] | None = None
    """Columns carried through to the dataset; None carries every other column."""

    def validate(self) -> None:
        _check(bool(self.path), "source.path", "is empty")
        _check(self.format in (None, *SOURCE_FORMATS), "source.format",
               f"{self.format!r} is not one of {SOURCE_FORMATS}")
        _check(self.url_col != self.caption_col, "source.caption_col", "must differ from url_col")


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
        _check(not bad, "guard.allowed_schemes", f"only http and https can be fetched, got {bad}")
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as err:
                raise ValueError(f"guard.allow_networks: {cidr!r} is not a CIDR ({err})") from None
        _check(self.max_bytes > 0, "guard.max_bytes", "must be positive")
        _check(self.max_pixels > 0, "guard.max_pixels", "must be positive")
        _check(self.deadline_s > 0, "guard.deadline_s", "must be positive")
        _check(0 <= self.max_redirects <= 20, "guard.max_redirects", "must be in [0, 20]")


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
        _check(self.image_size >= 8, "download.image_size", "must be at least 8")
        _check(self.resize_mode in RESIZE_MODES, "download.resize_mode",
               f"{self.resize_mode!r} is not one of {RESIZE_MODES}")
        _check(self.encode_format in ENCODE_FORMATS, "download.encode_format",
               f"{self.encode_format!r} is not one of {ENCODE_FORMATS}")
        _check(self.processes >= 1, "download.processes", "must be at least 1")
        _check(self.threads >= 1, "download.threads", "must be at least 1")
        _check(self.timeout_s > 0, "download.timeout_s", "must be positive")
        _check(self.retries >= 0, "download.retries", "must be >= 0")
        _check(self.samples_per_shard >= 1, "download.samples_per_shard", "must be at least 1")
        _check(self.max_aspect_ratio >= 1, "download.max_aspect_ratio", "must be >= 1")


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
        _check(self.caption_min_words >= 0, "filters.caption_min_words", "must be >= 0")
        _check(self.caption_max_chars >= 1, "filters.caption_max_chars", "must be >= 1")
        _check(0 <= self.language_min_confidence <= 1, "filters.language_min_confidence", "must be in [0, 1]")
        missing = [code for code in self.languages if code not in self.language_candidates]
        _check(not missing, "filters.languages", f"{missing} must also be in language_candidates")
        _check(-1 <= self.near_dup_max_distance <= 32, "filters.near_dup_max_distance", "must be in [-1, 32]")
        if self.model_score_uri:
            _check((self.model_score_threshold is None) != (self.model_score_top_fraction is None),
                   "filters.model_score_threshold", "set exactly one of model_score_threshold / _top_fraction")
            _check(self.model_score_top_fraction is None or 0 < self.model_score_top_fraction <= 1,
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
        _check(0 <= self.val_fraction < 1, "split.val_fraction", "must be in [0, 1)")
        _check(0 <= self.test_fraction < 1, "split.test_fraction", "must be in [0, 1)")
        _check(self.val_fraction + self.test_fraction < 1, "split", "val + test fractions must leave rows for train")


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the train split's captions (HF tokenizers)."""

    vocab_size: int = 4096
    """Upper bound on the vocabulary; a small corpus yields fewer tokens."""
    min_frequency: int = 2
    """A merge must occur this often to be learned."""

    def validate(self) -> None:
        _check(self.vocab_size >= 300, "tokenizer.vocab_size", "must be >= 300 (256 bytes + special tokens)")
        _check(self.min_frequency >= 1, "tokenizer.min_frequency", "must be >= 1")


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
        _check(bool(self.out), "out", "is empty")
        _check(self.rows_per_shard >= 1, "rows_per_shard", "must be at least 1")
        for part in (self.source, self.guard, self.download, self.filters, self.split, self.tokenizer):
            part.validate()


STAGES = ("contrastive", "fusion", "image-tokenizer", "unified")
PRIMARY_METRICS = {"contrastive": "retrieval.image_to_text_recall_5", "fusion": "vqa.accuracy",
                   "image-tokenizer": "reconstruction.psnr", "unified": "vqa.accuracy"}
"""What the promotion gate compares for each stage's models, unless told otherwise."""
STAGE_LOSSES = {"contrastive": ("clip", "siglip"), "fusion": ("next-token",), "image-tokenizer": ("mse",),
                "unified": ("next-token",)}
PRECISIONS = ("auto", "fp32", "bf16")
STAGE_PARENTS = {"fusion": ("contrastive", "models:/mmpipe-contrastive@champion"),
                 "unified": ("image-tokenizer", "models:/mmpipe-image-tokenizer@champion")}
"""The stages that build on a registered model: the parent's stage and the default parent."""


def project_home() -> Path:
    """Where mmpipe keeps its state by default: $MMPIPE_HOME or ~/.mmpipe (read, never created, here)."""
    return Path(os.environ.get("MMPIPE_HOME", "~/.mmpipe")).expanduser()


@dataclass
class ModelConfig:
    """Which architecture to train (models/configs/*.json)."""

    name: str = "clip-demo"
    """Architecture name; `mmpipe models archs` lists them."""
    parent: str = ""
    """The registered model this stage builds on (models:/name@alias or /version); fusion takes its
    vision tower, unified its image tokenizer. An alias is resolved to a version when the run starts
    and recorded."""
    freeze_vision: bool = True
    """Keep the parent's vision tower frozen (LLaVA, LiT); False trains it with the rest."""
    lm_parent: str = ""
    """A registered fusion model whose language model starts this one (empty: trained from scratch)."""


@dataclass
class TaskConfig:
    """The training stage and its objective."""

    stage: str = "contrastive"
    """contrastive (CLIP/SigLIP), fusion (LLaVA/Flamingo), image-tokenizer (FSQ autoencoder) or unified
    (early fusion over text and image codes)."""
    loss: str = "clip"
    """contrastive: clip (InfoNCE) or siglip (pairwise sigmoid); fusion: next-token (on answer tokens);
    image-tokenizer: mse (pixel reconstruction); unified: next-token (answers, captions and image codes)."""
    question_loss: float = 0.0
    """fusion: weight of a next-token loss on the questions' tokens beside the answers' (0: answers
    only, as instruction tuning a pretrained LM does). An LM trained from scratch with it learns to carry
    the asked group from the question to the answer much sooner (docs/benchmarks.md, fusion)."""

    def validate(self) -> None:
        _check(self.stage in STAGES, "task.stage", f"{self.stage!r} is not one of {STAGES}")
        losses = STAGE_LOSSES[self.stage]
        _check(self.loss in losses, "task.loss", f"{self.loss!r} is not one of {losses} (stage {self.stage})")
        _check(self.question_loss >= 0, "task.question_loss", f"{self.question_loss} is negative")
        _check(self.question_loss == 0 or self.stage == "fusion", "task.question_loss",
               f"is a fusion setting (stage {self.stage})")


@dataclass
class DataConfig:
    """What to stream from the dataset version."""

    dataset: str = ""
    """Path of the dataset version (a directory with manifest.json)."""
    batch_size: int = 64
    """Global batch: per-worker batch x workers x gradient accumulation."""
    val_batches: int = 4
    """Validation batches per worker, at every checkpoint and at the end: the first ones of the worker's
    share of the val split, the same rows every time."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before training starts."""
    augment: bool = True
    """Random crops on the train split (never flips: captions say left and right)."""
    pack_length: int = 0
    """Fusion and unified stages: 0 asks one question per image in a training sequence; N packs as
    many of the image's questions as fit in N text tokens (at least the model's context), each seeing
    the image and itself only: several questions learned for one image's cost (the unified stage's
    drawing samples are padded to the same length)."""
    record_samples: bool = False
    """Write the rows each worker trained on, in order, to <run dir>/samples/rank-N.tsv (epoch, row index
    in the train split); resumes cut the file back to the checkpoint, so it lists exactly what the model saw."""

    def validate(self) -> None:
        _check(bool(self.dataset), "data.dataset", "no dataset version given")
        _check(self.batch_size >= 1, "data.batch_size", "must be at least 1")
        _check(self.val_batches >= 0, "data.val_batches", "must be >= 0")
        _check(self.pack_length >= 0, "data.pack_length", "must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 20
    max_steps: int = 200
    """Optimizer steps in the run (epochs repeat the train split as needed)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses tolerated (each skipped and counted) before the run stops."""

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(self.max_steps >= 1, "optim.max_steps", "must be at least 1")
        _check(0 <= self.warmup_steps <= self.max_steps, "optim.warmup_steps", "must be in [0, max_steps]")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(self.max_bad_steps >= 1, "optim.max_bad_steps", "must be at least 1")


@dataclass
class ParallelConfig:
    """How DeepSpeed and Ray Train spread the work."""

    num_workers: int = 2
    """Ray Train workers (one rank each)."""
    threads_per_worker: int = 0
    """torch CPU threads in each worker; 0 = the node's cores divided by the workers on it."""
    use_gpu: bool | None = None
    """One GPU per worker; None uses GPUs when the cluster has them."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    precision: str = "auto"
    """auto = bf16 on CUDA GPUs that support it, fp32 elsewhere; or fp32 / bf16."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    offload_optimizer: bool = False
    """ZeRO offload of optimizer state to CPU memory (stage >= 1)."""
    offload_params: bool = False
    """ZeRO-3 offload of parameters to CPU memory."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (memory for compute)."""

    def validate(self) -> None:
        _check(self.num_workers >= 1, "parallel.num_workers", "must be at least 1")
        _check(self.threads_per_worker >= 0, "parallel.threads_per_worker", "must be >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"{self.zero_stage} is not 0, 1, 2 or 3")
        _check(self.precision in PRECISIONS, "parallel.precision", f"{self.precision!r} is not one of {PRECISIONS}")
        _check(self.grad_accum >= 1, "parallel.grad_accum", "must be at least 1")
        _check(not self.offload_optimizer or self.zero_stage >= 1, "parallel.offload_optimizer", "needs zero_stage >= 1")
        _check(not self.offload_params or self.zero_stage == 3, "parallel.offload_params", "needs zero_stage 3")


@dataclass
class CheckpointConfig:
    """Atomic checkpoints for resume."""

    every_steps: int = 50
    """Save a checkpoint every this many optimizer steps (the last step writes the final model instead)."""
    keep: int = 2
    """Newest checkpoints kept."""
    max_failures: int = 1
    """Worker-group restarts (from the newest verified checkpoint) before the run fails."""

    def validate(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.every_steps", "must be at least 1")
        _check(self.keep >= 1, "checkpoint.keep", "must be at least 1")
        _check(self.max_failures >= 0, "checkpoint.max_failures", "must be >= 0")


@dataclass
class TrackingConfig:
    """Where runs and models are recorded (MLflow)."""

    uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db
    (artifacts in <home>/mlartifacts)."""
    experiment: str = "mmpipe"
    model_name: str = ""
    """Registered model name; empty = mmpipe-<stage>."""
    alias: str = "candidate"
    """Alias set on the new model version."""
    wait_s: float = 120.0
    """How long the end of a run waits for an MLflow server that stopped answering: to take the metric
    points kept while it was down, then to register the model (after that, a clear error)."""


@dataclass
class ClusterConfig:
    """Which Ray to run on."""

    address: str = ""
    """Address of an existing Ray cluster (ray://host:10001 or host:6379); empty: $RAY_ADDRESS, else a local Ray."""
    num_cpus: int = 0
    """Logical CPUs of a local Ray; 0 = max(4, cores), so data tasks are not starved by workers."""
    storage_path: str = ""
    """Where runs and checkpoints live: a directory every node sees, or object storage (s3://bucket/prefix);
    empty = $MMPIPE_STORAGE/runs, else <home>/runs."""
    placement_strategy: str = "PACK"
    """How Ray places the training workers: PACK (as few nodes as fit), SPREAD (across nodes), or
    STRICT_PACK / STRICT_SPREAD."""

    def validate(self) -> None:
        _check(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
               "cluster.placement_strategy", f"must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
               f"got {self.placement_strategy!r}")


@dataclass
class RunConfig:
    """One training run of one stage; recipes (mmcore/recipes.py) return these."""

    recipe: str = "custom"
    """Name of the recipe it came from (part of the stable run name)."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        for part in (self.task, self.data, self.optim, self.parallel, self.checkpoint, self.cluster):
            part.validate()
        if self.task.stage in STAGE_PARENTS:
            kind, example = STAGE_PARENTS[self.task.stage]
            _check(self.model.parent.startswith("models:/"), "model.parent",
                   f"{self.model.parent!r}: the {self.task.stage} stage needs a registered {kind} model, "
                   f"e.g. {example}")
        _check(not self.model.lm_parent or self.task.stage == "fusion", "model.lm_parent",
               "only the fusion stage starts its LM from a registered fusion model")
        _check(not self.data.pack_length or self.task.stage in ("fusion", "unified"), "data.pack_length",
               "only the fusion and unified stages pack questions")
        step_rows = self.parallel.num_workers * self.parallel.grad_accum
        _check(self.data.batch_size % step_rows == 0, "data.batch_size",
               f"{self.data.batch_size} is not divisible by parallel.num_workers x parallel.grad_accum = {step_rows}")

    @property
    def micro_batch(self) -> int:
        """Rows per worker per forward pass."""
        return self.data.batch_size // (self.parallel.num_workers * self.parallel.grad_accum)


@dataclass
class GateConfig:
    """When a candidate replaces the champion."""

    primary: str = ""
    """suite.metric compared between candidate and champion (higher is better); empty: the stage's
    own (PRIMARY_METRICS: retrieval.image_to_text_recall_5 for contrastive, vqa.accuracy for fusion)."""
    margin: float = 0.0
    """The candidate must beat the champion by at least this much (and strictly)."""
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    previous_alias: str = "previous-champion"
    """The champion being replaced keeps this alias, for rollback."""

    def validate(self) -> None:
        _check(not self.primary or "." in self.primary, "gate.primary", f"{self.primary!r} is not suite.metric")
        _check(self.margin >= 0, "gate.margin", "must be >= 0")
        aliases = {self.candidate_alias, self.champion_alias, self.previous_alias}
        _check(len(aliases) == 3, "gate", "candidate, champion and previous aliases must differ")


def to_dict(cfg: Any) -> dict:
    """A config as plain JSON-able data (for manifests and run params)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from plain data; an unknown key or a value of the wrong type is an
    error naming the field."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    kwargs = {}
    for name, value in data.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a section of fields, got {_shown(value)}")
            kwargs[name] = from_dict(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _typed(value, sub, f"{prefix}{name}")
    return cls(**kwargs)


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value` when it has the field's type (an int passes for a float), else a ValueError naming the field."""
    if hint is Any:
        return value
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if option in (int, str, bool) and isinstance(value, option) and (option is bool or not isinstance(value, bool)):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            return [_typed(item, typing.get_args(option)[0], f"{name}[{i}]") for i, item in enumerate(value)]
    wanted = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) if typing.get_origin(o) is None
                         else str(o) for o in options)
    raise ValueError(f"{name}: expected {wanted}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
