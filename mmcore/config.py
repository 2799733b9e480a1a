"""Typed run configs, one dataclass per concern, nested into RunConfig; validated at the edge. The typed
parsing (`from_dict`) and `to_dict` serve every config (ingest's are in mmcore/data/config.py)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcore.stages import STAGES

def check(condition: bool, name: str, message: str) -> None:
    """Raise a ValueError naming the config field when `condition` is false."""
    if not condition:
        raise ValueError(f"{name}: {message}")


PRECISIONS = ("auto", "fp32", "bf16")


def project_home() -> Path:
    """Where mmpipe keeps its state by default: $MMPIPE_HOME or ~/.mmpipe (read, never created, here)."""
    return Path(os.environ.get("MMPIPE_HOME", "~/.mmpipe")).expanduser()


@dataclass
class LoraSettings:
    """LoRA (peft) on a language parent's LM in the fusion stage: adapters train, the LM's weights stay."""

    rank: int = 0
    """0: no LoRA (the LM trains whole, or is frozen with model.freeze_lm)."""
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """The LM's linear layers that get adapters (by the name they end with; Llama's attention by default)."""
    merge: bool = True
    """Register the adapters merged into the LM's weights (a plain model); false: the adapters and the rest of
    the model alone, naming the language parent's version they adapt, which loading fetches from the registry
    (a model the size of its adapters, not of its LM)."""

    def validate(self) -> None:
        check(self.rank >= 0, "model.lora.rank", "must be >= 0")
        check(self.alpha > 0, "model.lora.alpha", "must be > 0")
        check(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
        check(bool(self.target_modules) or not self.rank, "model.lora.target_modules", "names no layer")


@dataclass
class ModelConfig:
    """Which architecture to train (models/configs/*.json)."""

    name: str = "clip-demo"
    """Architecture name; `mmpipe models archs` lists them."""
    parent: str = ""
    """The registered model this stage builds on (models:/name@alias or /version); fusion takes its
    vision tower, unified its image tokenizer; contrastive fine-tunes it (trained or imported: its architecture,
    weights and tokenizer; model.name is then not used). An alias is resolved to a version when the run starts
    and recorded."""
    freeze_vision: bool = True
    """Keep the parent's vision tower frozen (LLaVA; LiT when contrastive fine-tunes a parent: only the text
    side learns); False trains it with the rest."""
    lm_parent: str = ""
    """A registered language model (mmpipe-language, trained or imported) that the fusion model's LM starts
    from, its tokenizer and chat format with it (empty: an LM trained from scratch on the dataset's tokenizer)."""
    freeze_lm: bool = False
    """Keep the language parent's LM frozen (LLaVA's alignment phase): only the projector trains."""
    start_from: str = ""
    """A registered model of this stage and architecture whose weights this run starts from (LLaVA's
    instruction phase starts from its alignment phase's model), pinned and tagged like a parent."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA on the language parent's LM, registered merged into its weights or as adapters naming it."""


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
    the asked group from the question to the answer much sooner (experiments/fusion-binding)."""
    text_loss: float = 1.0
    """language: weight of the next-token loss on the text a chat is about (the caption and the questions; a
    row with no question: its caption) beside the answers' (each the mean over its own tokens; 0: answers
    only). Below 1 the LM learns to read the answer out of the caption sooner (experiments/language-stage)."""

    def validate(self) -> None:
        check(self.stage in STAGES, "task.stage", f"{self.stage!r} is not one of {tuple(STAGES)}")
        losses = STAGES[self.stage].losses
        check(self.loss in losses, "task.loss", f"{self.loss!r} is not one of {losses} (stage {self.stage})")
        check(self.question_loss >= 0, "task.question_loss", f"{self.question_loss} is negative")
        check(self.question_loss == 0 or STAGES[self.stage].question_loss, "task.question_loss",
               f"is not a setting of the {self.stage} stage")
        check(self.text_loss >= 0, "task.text_loss", f"{self.text_loss} is negative")
        check(self.text_loss == 1.0 or STAGES[self.stage].text_loss, "task.text_loss",
              f"is not a setting of the {self.stage} stage")


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
    """Fusion and unified stages: 0 cuts a conversation at the model's context; N (at least the context)
    packs the turns after the cut in N text tokens, in parts after the shared image prefix, each part seeing
    the image and itself only: every turn learned for one image's cost (data/instruct.py; the unified
    stage's drawing samples are padded to the same length)."""
    mix: dict[str, float] = field(default_factory=dict)
    """Other dataset versions trained on with data.dataset, each path with its weight: the share of the training
    rows drawn from it (data.dataset gives the rest; validation reads data.dataset alone). The fusion stage
    learns captions from a caption dataset and conversations from an instruction dataset; the unified stage
    draws from captions and reads conversations."""
    draw_fraction: float = 0.5
    """Unified stage: the share of a caption dataset's rows that are drawing samples (the rest ask for the
    caption); an instruction dataset's rows are read as their conversations."""
    derived: bool = True
    """Read what a frozen parent computes (the unified stage's image codes, a frozen tower's tokens) from derived
    versions of the datasets, computed once per (dataset version, parent version) (data/derived.py); false:
    computed again in every step from the pixels (a tower's tokens can outweigh the images: ViT-L/14's are
    1.2 MB a row in float16)."""
    captioner: str = ""
    """Recaptioning: a registered fusion or unified model (models:/name@alias or /version) whose caption of each
    image the train split reads instead of the dataset's (DALL-E 3's and ShareGPT4V's recipe), computed once per
    (dataset version, captioner version) as a derived version (`mmpipe infer --output captions`); validation
    reads the dataset's captions. Caption datasets only (a mix's instruction datasets are read as they are)."""
    generated_share: float = 1.0
    """With data.captioner: the share of train rows that read the generated caption, drawn per row and epoch
    (1: instead of the dataset's; 0.5: half each, beside it)."""
    record_samples: bool = False
    """Write the rows each worker trained on, in order, to <run dir>/samples/rank-N.tsv (epoch, row index
    in the train split); resumes cut the file back to the checkpoint, so it lists exactly what the model saw."""

    def validate(self) -> None:
        check(bool(self.dataset), "data.dataset", "no dataset version given")
        check(self.batch_size >= 1, "data.batch_size", "must be at least 1")
        check(self.val_batches >= 0, "data.val_batches", "must be >= 0")
        check(self.pack_length >= 0, "data.pack_length", "must be >= 0")
        check(all(0 < w < 1 for w in self.mix.values()) and sum(self.mix.values()) < 1, "data.mix",
              "each weight must be in (0, 1) and together under 1 (data.dataset gives the rest)")
        check(self.dataset not in self.mix, "data.mix", "names data.dataset itself")
        check(0 <= self.draw_fraction <= 1, "data.draw_fraction", "must be in [0, 1]")
        check(0 <= self.generated_share <= 1, "data.generated_share", "must be in [0, 1]")


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
    bridge_lr: float = 0.0
    """The learning rate of what joins a fusion model's tower to its LM (LLaVA's projector, Flamingo's
    resampler and cross-attention) in a parameter group of its own, as LLaVA's mm_projector_lr; 0: lr.
    Warmup and decay scale it as they scale lr."""
    fused: bool = False
    """torch's fused AdamW (one kernel over the parameters per step, on CPUs and GPUs) instead of its default
    implementation; not with parallel.offload_optimizer (DeepSpeed's CPU Adam). Off in every recipe: on 2 CPU
    cores the demo models' steps were as fast within the run-to-run spread (experiments/fused-adamw)."""

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", "must be positive")
        check(self.bridge_lr >= 0, "optim.bridge_lr", "must be >= 0")
        check(self.max_steps >= 1, "optim.max_steps", "must be at least 1")
        check(0 <= self.warmup_steps <= self.max_steps, "optim.warmup_steps", "must be in [0, max_steps]")
        check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        check(self.max_bad_steps >= 1, "optim.max_bad_steps", "must be at least 1")


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
    compile: bool = False
    """torch.compile (inductor) the Task inside DeepSpeed's engine: fused kernels, for a compile at each
    worker's start. Off in every recipe: on 2 CPU cores the demo models ran 0.93-1.30x as fast compiled in one
    process (docs/benchmarks.md, bench/mfu.py), and the unified stage 0.77x as the demo trains it (2 workers)."""

    def validate(self) -> None:
        check(self.num_workers >= 1, "parallel.num_workers", "must be at least 1")
        check(self.threads_per_worker >= 0, "parallel.threads_per_worker", "must be >= 0")
        check(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"{self.zero_stage} is not 0, 1, 2 or 3")
        check(self.precision in PRECISIONS, "parallel.precision", f"{self.precision!r} is not one of {PRECISIONS}")
        check(self.grad_accum >= 1, "parallel.grad_accum", "must be at least 1")
        check(not self.offload_optimizer or self.zero_stage >= 1, "parallel.offload_optimizer", "needs zero_stage >= 1")
        check(not self.offload_params or self.zero_stage == 3, "parallel.offload_params", "needs zero_stage 3")


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
        check(self.every_steps >= 1, "checkpoint.every_steps", "must be at least 1")
        check(self.keep >= 1, "checkpoint.keep", "must be at least 1")
        check(self.max_failures >= 0, "checkpoint.max_failures", "must be >= 0")


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
    """Where training runs: Ray Train workers (which Ray), or this process."""

    executor: str = "ray"
    """ray: Ray Train workers, fed by Ray Data; here: this process, one rank, fed by reads in the process
    (no Ray started; parallel.num_workers must be 1). Both run the same Trainer and register alike."""
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
        check(self.executor in ("ray", "here"), "cluster.executor", f"must be ray or here, got {self.executor!r}")
        check(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
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
        stage = STAGES[self.task.stage]
        if stage.parent and (stage.parent.default or self.model.parent):
            check(self.model.parent.startswith("models:/"), "model.parent",
                   f"{self.model.parent!r}: the {stage.name} stage needs a registered {stage.parent.stage} model, "
                   f"e.g. {stage.parent.default or f'models:/mmpipe-{stage.parent.stage}@champion'}")
        check(not self.model.lm_parent or stage.lm_parent, "model.lm_parent",
               f"the {stage.name} stage does not start its LM from a registered model")
        check(self.model.lm_parent.startswith("models:/") or not self.model.lm_parent, "model.lm_parent",
               f"{self.model.lm_parent!r}: a registered language model, e.g. models:/mmpipe-language@champion")
        check(not self.model.freeze_lm or bool(self.model.lm_parent), "model.freeze_lm",
               "only a language parent's LM can be frozen (set model.lm_parent)")
        self.model.lora.validate()
        check(not self.model.lora.rank or (bool(self.model.lm_parent) and not self.model.freeze_lm), "model.lora.rank",
               "LoRA adapts a language parent's LM that trains (set model.lm_parent, and model.freeze_lm=false)")
        check(not self.model.start_from or stage.starts_from, "model.start_from",
              f"the {stage.name} stage does not start from a registered model of its own"
              + (" (model.parent fine-tunes one)" if stage.parent and stage.parent.stage == stage.name else ""))
        check(not self.model.start_from or self.model.start_from.startswith("models:/"), "model.start_from",
               f"{self.model.start_from!r}: a registered model, e.g. models:/mmpipe-fusion@aligned")
        check(not self.optim.bridge_lr or stage.name == "fusion", "optim.bridge_lr",
              f"the {stage.name} stage has no tower joined to an LM")
        check(not (self.optim.fused and self.parallel.offload_optimizer), "optim.fused",
              "torch's fused AdamW does not run with parallel.offload_optimizer (DeepSpeed's CPU Adam does)")
        check(not self.data.pack_length or stage.packs, "data.pack_length",
               f"the {stage.name} stage does not pack questions")
        check(self.cluster.executor == "ray" or self.parallel.num_workers == 1, "parallel.num_workers",
              f"{self.parallel.num_workers} workers need cluster.executor=ray; training here runs one rank")
        step_rows = self.parallel.num_workers * self.parallel.grad_accum
        check(self.data.batch_size % step_rows == 0, "data.batch_size",
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
    own (mmcore/stages.py: retrieval.image_to_text_recall_5 for contrastive, vqa.accuracy for fusion)."""
    margin: float = 0.0
    """The candidate must beat the champion by at least this much (and strictly)."""
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"
    previous_alias: str = "previous-champion"
    """The champion being replaced keeps this alias, for rollback."""

    def validate(self) -> None:
        check(not self.primary or "." in self.primary, "gate.primary", f"{self.primary!r} is not suite.metric")
        check(self.margin >= 0, "gate.margin", "must be >= 0")
        aliases = {self.candidate_alias, self.champion_alias, self.previous_alias}
        check(len(aliases) == 3, "gate", "candidate, champion and previous aliases must differ")


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
        optional = [o for o in typing.get_args(sub) if o is not type(None)] if isinstance(sub, types.UnionType) else []
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):  # `Config | None`: a section, or null
            if value is None:
                kwargs[name] = None
                continue
            sub = optional[0]
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
        if option is dict and isinstance(value, dict):
            return value
        if typing.get_origin(option) is dict and isinstance(value, dict):
            key, item = typing.get_args(option)
            return {_typed(k, key, f"{name} key"): _typed(v, item, f"{name}[{k!r}]") for k, v in value.items()}
        if typing.get_origin(option) is list and isinstance(value, list):
            return [_typed(item, typing.get_args(option)[0], f"{name}[{i}]") for i, item in enumerate(value)]
    wanted = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) if typing.get_origin(o) is None
                         else str(o) for o in options)
    raise ValueError(f"{name}: expected {wanted}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
