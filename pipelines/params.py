"""Flow parameters: typed pydantic models, so the Prefect UI shows a validated form for each flow.

Each model turns into the library's dataclass config (`to_config`); the limits here are the
ones a form can check, the configs' own `validate()` still runs inside the library.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from mmcore import storage
from mmcore.cli import apply_overrides
from mmcore.config import GateConfig, RunConfig, to_dict
from mmcore.data.config import GuardConfig, IngestConfig, SourceConfig
from mmcore.data.source import source_sha256
from mmcore.recipes import RECIPES, recipe
from mmcore.redact import CREDENTIAL_FREE
from mmcore.stages import STAGES

RecipeName = Literal[tuple(RECIPES)]  # a choice in the UI form
Stage = Literal[tuple(STAGES)]


def _no_credentials(value: str) -> str:
    if not re.match(CREDENTIAL_FREE, value):
        raise ValueError("holds credentials in a URI (scheme://user:password@...): a flow parameter is stored "
                         "with the run and shown in the Prefect UI; give the worker its credentials in the "
                         "environment instead (MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, AWS_*)")
    return value


Plain = Annotated[str, AfterValidator(_no_credentials), Field(json_schema_extra={"pattern": CREDENTIAL_FREE})]
"""A text parameter without credentials; the API server checks the pattern too, so a secret typed into
the UI's form is refused before a flow run stores it."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored


class IngestParams(_Params):
    """URL list -> filtered, versioned dataset (the `ingest` flow)."""

    url_list: Plain = Field(description="A .parquet, .csv or .jsonl URL list, or a directory of them; with kind "
                                        "instructions, a LLaVA-format conversation file (.json or .jsonl).")
    kind: Literal["captions", "instructions"] = Field("captions", description="captions: image-text pairs; "
                                                      "instructions: conversations about images.")
    images: Plain = Field("", description="kind instructions: the directory (or s3://bucket/prefix) the file's "
                                        "image paths are relative to (image URLs need none).")
    out: Plain = Field("", description="Dataset version to create: a directory or s3://bucket/prefix. Empty: "
                                     "<storage>/datasets/<list>-<hash of the list and settings>, so a re-run "
                                     "resumes or reuses it (<storage>: $MMPIPE_STORAGE, else the project home).")
    url_col: str = Field("url", description="Column holding the image URL.")
    caption_col: str = Field("caption", description="Column holding the caption.")
    allow_networks: list[str] = Field(default_factory=list, description="CIDRs the URL guard may reach although "
                                      "private or loopback, e.g. 127.0.0.1/32 for a loopback server.")
    image_size: int = Field(64, ge=8, le=4096, description="Side of the stored images in pixels.")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="Caption languages to keep "
                                 "(ISO 639-1); empty keeps every language.")
    overrides: list[Plain] = Field(default_factory=list, description="Any other IngestConfig field as field=value "
                                 "(JSON value), e.g. filters.near_dup_max_distance=2.")

    def to_config(self) -> IngestConfig:
        cfg = IngestConfig(source=SourceConfig(self.url_list, url_col=self.url_col, caption_col=self.caption_col,
                                               kind=self.kind, images=self.images or None),
                           out=self.out or "-", guard=GuardConfig(allow_networks=list(self.allow_networks)))
        settings = [f"download.image_size={self.image_size}", f"filters.languages={json.dumps(self.languages)}"]
        cfg = apply_overrides(cfg, settings + list(self.overrides))
        if not self.out:
            cfg.out = str(default_out(cfg))
        cfg.validate()
        return cfg


def default_out(cfg: IngestConfig):
    """<storage root>/datasets/<list name>-<hash>: the same list and settings always map to the same version."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "work_dir")}
    digest = hashlib.sha256(json.dumps([source_sha256(cfg.source), settings], sort_keys=True).encode())
    return storage.root() / "datasets" / f"{Path(cfg.source.path).stem}-{digest.hexdigest()[:12]}"


class TrainSettings(_Params):
    """How to train: a recipe and the knobs people change most (the rest via `overrides`)."""

    stage: Stage = Field("contrastive", description="Training stage.")
    recipe: RecipeName = Field(STAGES["contrastive"].recipe, description="Named RunConfig (mmcore/recipes.py); debug is the quickest.")
    batch_size: int | None = Field(None, ge=1, le=1_048_576, description="Global batch; empty: the recipe's.")
    max_steps: int | None = Field(None, ge=1, le=100_000_000, description="Optimizer steps; empty: the recipe's.")
    zero_stage: int | None = Field(None, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3; empty: the recipe's.")
    num_workers: int | None = Field(None, ge=1, le=4096, description="Ray Train workers; empty: the recipe's.")
    ray_address: Plain = Field("", description="An existing Ray cluster (ray://head:10001 or head:6379); empty: "
                                             "$RAY_ADDRESS, else a local Ray.")
    overrides: list[Plain] = Field(default_factory=list, description="Any other RunConfig field as field=value "
                                 "(JSON value), e.g. optim.lr=0.0005.")

    def to_config(self, dataset: str) -> RunConfig:
        picked = {"data.batch_size": self.batch_size, "optim.max_steps": self.max_steps,
                  "parallel.zero_stage": self.zero_stage, "parallel.num_workers": self.num_workers,
                  "cluster.address": self.ray_address or None}
        settings = [f"{k}={json.dumps(v)}" for k, v in picked.items() if v is not None]
        cfg = recipe(self.recipe, dataset)
        if cfg.task.stage != self.stage:
            raise ValueError(f"recipe {self.recipe} trains the {cfg.task.stage} stage, not {self.stage}")
        cfg = apply_overrides(cfg, settings + list(self.overrides))
        if cfg.optim.warmup_steps > cfg.optim.max_steps:  # a short run keeps the recipe's schedule shape
            cfg.optim.warmup_steps = cfg.optim.max_steps // 10
        cfg.validate()
        return cfg


class TrainParams(TrainSettings):
    """Train a stage on a dataset version and register the model (the `train` flow)."""

    dataset: Plain = Field(description="Dataset version directory (made by ingest).")


class GateParams(_Params):
    """How the promotion gate compares candidate and champion."""

    suites: list[str] = Field(default_factory=list, description="Suites to run; empty: every suite the model fits.")
    primary: str = Field("", pattern=r"^([\w-]+\.\w+)?$",
                         description="suite.metric compared between candidate and champion (higher is better); "
                                     "empty: the stage's (retrieval.image_to_text_recall_5, vqa.accuracy).")
    margin: float = Field(0.0, ge=0, le=1, description="Improvement the candidate needs over the champion.")
    classes: Plain = Field("", description="A classes file for the zeroshot suite (JSON: the label column, the "
                                         "class names, prompt templates); empty: the suite does not apply.")

    def to_config(self) -> GateConfig:
        cfg = GateConfig(primary=self.primary, margin=self.margin)
        cfg.validate()
        return cfg


class InferParams(_Params):
    """Run a registered model over every row of a dataset version, kept beside it as a derived version (the `infer`
    flow; `mmpipe infer`)."""

    model: Plain = Field(description="models:/NAME@ALIAS or models:/NAME/VERSION (pinned to its version).")
    dataset: Plain = Field(description="Dataset version directory (made by ingest).")
    output: Literal["embeddings", "clip-score", "codes", "captions"] = Field(
        "clip-score", description="embeddings or clip-score: a contrastive model; codes: an image tokenizer; "
                                  "captions: a fusion or unified model.")
    ray_address: Plain = Field("", description="An existing Ray cluster (ray://head:10001 or head:6379); empty: "
                                               "$RAY_ADDRESS, else a local Ray.")


class EvaluateParams(GateParams):
    """Evaluate a registered model and, for an @candidate, run the promotion gate (the `evaluate` flow)."""

    model: str = Field("mmpipe-contrastive", description="Registered model name.")
    dataset: Plain = Field(description="Dataset version directory to evaluate on (its test split).")
    promote: bool = Field(True, description="Compare @candidate with @champion and move the alias on a clear win; "
                                            "off: only evaluate @candidate.")


class LanguageSettings(TrainSettings):
    """The language stage in `retrain`: a decoder LM on the dataset's text, the fusion stage's language parent."""

    stage: Stage = Field("language", description="Training stage.")
    recipe: RecipeName = Field(STAGES["language"].recipe, description="Named RunConfig (mmcore/recipes.py): "
                                                             "demo-language, debug-language.")


class FusionSettings(TrainSettings):
    """The fusion stage in `retrain`: its parent is the contrastive champion after the gate."""

    stage: Stage = Field("fusion", description="Training stage.")
    recipe: RecipeName = Field(STAGES["fusion"].recipe, description="Named RunConfig (mmcore/recipes.py): demo-fusion (LLaVA), "
                                                          "demo-flamingo, quality-fusion (LLaVA, 5x the steps), "
                                                          "long-fusion (12.5x, for a GPU), debug-fusion; "
                                                          "demo-instruction (after alignment_recipe).")
    alignment_recipe: RecipeName | None = Field(None, description="LLaVA's first phase, trained (not gated) before "
                                                                  "`recipe` on the language champion: demo-alignment "
                                                                  "(then recipe demo-instruction); empty: one phase.")

    def phases(self, dataset: str, instructions: str | None = None) -> list[TrainParams]:
        """The runs of this stage: the alignment phase (its recipe, this stage's cluster settings and overrides)
        when there is one, on `dataset` (captions), then `recipe` on `instructions` (an instruction dataset) when
        given, else on `dataset`."""
        settings = self.model_dump(exclude={"alignment_recipe"})
        first = [] if not self.alignment_recipe else [TrainParams(dataset=dataset, **{
            **settings, "recipe": self.alignment_recipe, "batch_size": None, "max_steps": None})]
        return [*first, TrainParams(dataset=instructions or dataset, **settings)]


class TokenizerSettings(TrainSettings):
    """The image tokenizer in `retrain`."""

    stage: Stage = Field("image-tokenizer", description="Training stage.")
    recipe: RecipeName = Field(STAGES["image-tokenizer"].recipe, description="Named RunConfig (mmcore/recipes.py): demo-tokenizer, "
                                                             "debug-tokenizer.")


def mixed(settings: TrainSettings, dataset: str, instructions: str | None, weight: float, *also: str) -> TrainParams:
    """A stage's run on the captions `dataset`, or, with `instructions`, on the instruction dataset with the
    captions mixed in (data.mix, at 1 - `weight`) and the `also` overrides: the stage's tokenizer is then the
    instruction dataset's, whose text holds the questions as well as the captions (on the caption dataset's, the
    unified demo answered held-out wordings at 0.35, on the instructions' at 0.50: experiments/instruction-file)."""
    if not instructions:
        return TrainParams(dataset=dataset, **settings.model_dump())
    overrides = [*settings.overrides, f"data.mix={json.dumps({dataset: round(1 - weight, 6)})}", *also]
    return TrainParams(dataset=instructions, **{**settings.model_dump(), "overrides": overrides})


class UnifiedSettings(TrainSettings):
    """The unified stage in `retrain`: its parent is the image tokenizer champion after that gate."""

    stage: Stage = Field("unified", description="Training stage.")
    recipe: RecipeName = Field(STAGES["unified"].recipe, description="Named RunConfig (mmcore/recipes.py): demo-unified, "
                                                           "debug-unified.")


class RetrainParams(_Params):
    """Ingest (or take a landed dataset) -> contrastive -> language -> fusion on the contrastive (and language)
    champion -> image tokenizer -> unified on the tokenizer champion; each trained, evaluated and promoted (the
    `retrain` flow)."""

    source: IngestParams | None = Field(None, description="A URL list to ingest first; or leave empty and set "
                                                          "`dataset`.")
    dataset: Plain = Field("", description="An existing dataset version to train on (the dataset.landed trigger "
                                         "fills this in).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="The contrastive stage.")
    gate: GateParams = Field(default_factory=GateParams, description="The contrastive stage's gate.")
    skip_contrastive: bool = Field(False, description="Skip the contrastive stage (fusion then builds on the "
                                                      "current contrastive champion).")
    search_queries: list[Plain] = Field(default_factory=list, description="Texts searched in the dataset with "
                                        "the new contrastive model (`mmpipe search`); each one's contact sheet is "
                                        "attached to its MLflow run (search/), so a person sees what it finds.")
    language: LanguageSettings = Field(default_factory=LanguageSettings, description="The language stage.")
    language_gate: GateParams = Field(default_factory=GateParams, description="The language stage's gate.")
    skip_language: bool = Field(True, description="Skip the language stage (on by hand: on the demo corpus LLaVA "
                                                  "on it does not beat the one-phase LLaVA yet, docs/stages.md).")
    instructions: IngestParams | None = Field(None, description="A conversation file (LLaVA's format, kind "
                                              "instructions), ingested first: the fusion stage trains and is gated on "
                                              "it (an alignment phase stays on the captions); the language and "
                                              "unified stages mix it in by `instructions_weight`. Empty: they train "
                                              "on the dataset's captions alone.")
    instructions_weight: float = Field(0.5, gt=0, lt=1, description="The share of the language and unified "
                                       "stages' training rows drawn from the conversations (the unified stage then "
                                       "draws on every caption row).")
    fusion_gated_on: Literal["instructions", "dataset"] = Field(
        "instructions", description="With `instructions`: the test split the fusion stage is evaluated and gated on, "
        "the instruction dataset's (its conversations' turns) or the dataset's (captioning; the sample corpus's "
        "questions in seen and held-out wordings; side by side with the other stages).")
    fusion: FusionSettings = Field(default_factory=FusionSettings, description="The fusion stage.")
    fusion_gate: GateParams = Field(default_factory=GateParams, description="The fusion stage's gate.")
    skip_fusion: bool = Field(False, description="Skip the fusion stage.")
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings, description="The image tokenizer.")
    tokenizer_gate: GateParams = Field(default_factory=GateParams, description="The image tokenizer's gate.")
    unified: UnifiedSettings = Field(default_factory=UnifiedSettings, description="The unified stage.")
    unified_gate: GateParams = Field(default_factory=GateParams, description="The unified stage's gate.")
    skip_unified: bool = Field(False, description="Skip the image tokenizer and the unified stage.")

    @model_validator(mode="after")
    def _one_input(self) -> RetrainParams:
        if (self.source is None) == (not self.dataset):
            raise ValueError("set exactly one of `source` (a URL list to ingest) and `dataset` (an existing version)")
        if self.instructions is not None and self.instructions.kind != "instructions":
            raise ValueError("instructions: a conversation file for the fusion stage; set its kind to instructions")
        return self
