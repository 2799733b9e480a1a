"""A stage's parents in the registry: pinned from aliases to versions and checked against the
dataset before any worker starts, so a re-run resumes the same thing even if an alias moved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mmcore.bundle import ModelBundle
from mmcore.config import RunConfig, TrackingConfig
from mmcore.data.dataset import DatasetVersion
from mmcore.models import architecture
from mmcore.stages import STAGES


@dataclasses.dataclass
class Parents:
    cfg: RunConfig
    """The run config with model.parent (model.lm_parent, model.start_from) pinned to models:/name/version."""
    arch: dict
    """The architecture with the part of the parent it takes (its stage's Parent.takes)."""
    tags: dict[str, str]
    """parent_model (lm_parent_model, start_model) = name/version, for the registered version."""
    dirs: dict[str, Path] = dataclasses.field(default_factory=dict)
    """The parents' bundles fetched to this machine, by field (tasks.Parents)."""
    captioner: Path | None = None
    """data.captioner's bundle fetched to this machine: the plan's, not the Task's (its captions are data)."""


def check_family(cfg: RunConfig, arch: dict) -> None:
    families = STAGES[cfg.task.stage].families
    if arch.get("family") not in families:
        raise ValueError(f"model.name: {cfg.model.name} is a {arch.get('family')} model; the {cfg.task.stage} "
                         f"stage trains {' or '.join(families)} models")


def pin_parents(cfg: RunConfig, arch: dict, tracking_uri: str | None, version: DatasetVersion) -> Parents:
    """Resolve and check model.parent / model.lm_parent / model.start_from and data.captioner in the registry at
    `tracking_uri` (default: the configured one); clear errors name the URI and the misfit. Without parents,
    no registry is asked."""
    parents = _pin_model_parents(cfg, arch, tracking_uri, version)
    if not cfg.data.captioner:
        return parents
    from mmcore import tracking
    from mmcore.infer import pin_capable

    if version.kind != "captions":
        raise ValueError(f"data.captioner: dataset {version.id} holds {version.kind}; generated captions replace a "
                         "caption dataset's captions")
    try:
        captioner, bundle = pin_capable(cfg.data.captioner, "captions", tracking_uri or
                                        tracking.resolve_uri(TrackingConfig()), "data.captioner needs")
    except ValueError as err:
        raise ValueError(f"data.captioner: {err}") from None
    cfg = parents.cfg
    return Parents(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, captioner=captioner)), parents.arch,
                   {**parents.tags, "captioner_model": captioner.removeprefix("models:/")}, parents.dirs,
                   bundle.directory)


def _pin_model_parents(cfg: RunConfig, arch: dict, tracking_uri: str | None, version: DatasetVersion) -> Parents:
    check_family(cfg, arch)
    own_size = arch.get("image_size") or arch.get("vision", {}).get("image_size")  # fusion: the parent's, below
    _check_image_size(f"model.name: {cfg.model.name}", own_size, version)
    if not cfg.model.parent:
        return Parents(cfg, arch, {})
    spec = STAGES[cfg.task.stage].parent
    if spec is None:
        raise ValueError(f"model.parent: the {cfg.task.stage} stage builds on no registered model")
    parent, parent_cfg, bundle = _pinned(cfg.model.parent, tracking_uri, "model.parent", spec.stage)
    _check_image_size(f"model.parent: {parent}", json.loads(Path(bundle.preprocess).read_text())["image_size"],
                      version)
    # A parent of the run's own stage is the model fine-tuned: the architecture is all its.
    arch = spec.takes(parent_cfg) if spec.stage == cfg.task.stage else {**arch, **spec.takes(parent_cfg)}
    model = dataclasses.replace(cfg.model, parent=parent)
    tags = {"parent_model": parent.removeprefix("models:/")}
    dirs = {"parent": bundle.directory}
    if cfg.model.lm_parent:
        lm_spec = STAGES[cfg.task.stage].lm_parent
        lm_parent, lm_cfg, lm_bundle = _pinned(cfg.model.lm_parent, tracking_uri, "model.lm_parent", lm_spec.stage)
        if lm_cfg.get("chat_template"):  # an imported LM speaks its own template (data/instruct.py TemplateChat)
            if cfg.data.pack_length:
                raise ValueError(f"data.pack_length: questions are packed in mmpipe's chat format only; {lm_parent} "
                                 "has its own chat template: set data.pack_length=0")
            if cfg.task.question_loss:
                raise ValueError(f"task.question_loss: the question loss reads mmpipe's chat format; {lm_parent} has "
                                 "its own chat template: set task.question_loss=0")
        dirs["lm_parent"] = lm_bundle.directory
        arch = {**arch, **lm_spec.takes(lm_cfg)}
        lora = cfg.model.lora
        if lora.rank and not lora.merge:  # registered as adapters on this version of the parent (bundle.py)
            arch["adapters"] = {"base": lm_parent, "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                "target_modules": list(lora.target_modules)}
        model = dataclasses.replace(model, lm_parent=lm_parent)
        tags["lm_parent_model"] = lm_parent.removeprefix("models:/")
    if cfg.model.start_from:
        start, start_cfg, start_bundle = _pinned(cfg.model.start_from, tracking_uri, "model.start_from",
                                                 cfg.task.stage)
        if architecture(start_cfg) != architecture(arch):
            raise ValueError(f"model.start_from: {start} is another architecture than this run's ({cfg.model.name} "
                             "on its parents); a run starts from a model of its own architecture")
        if start_cfg.get("adapters"):
            raise ValueError(f"model.start_from: {start} holds LoRA adapters registered apart from the LM they adapt; "
                             "a run starts from a model registered whole (model.lora.merge=true)")
        dirs["start_from"] = start_bundle.directory
        model = dataclasses.replace(model, start_from=start)
        tags["start_model"] = start.removeprefix("models:/")
    return Parents(dataclasses.replace(cfg, model=model), arch, tags, dirs)


def fetch_parents(cfg: RunConfig, tracking_uri: str) -> dict[str, Path]:
    """The pinned parents of `cfg` (pin_parents' config) fetched to this machine: what a training worker
    on another node hands its Task."""
    from mmcore import registry

    fields = [field for field in ("parent", "lm_parent", "start_from") if getattr(cfg.model, field)]
    return {field: registry.model_files(getattr(cfg.model, field), tracking_uri).directory for field in fields}


def _check_image_size(what: str, size: int | None, version: DatasetVersion) -> None:
    """A model must not take larger images than the dataset stores (they would be upscaled blurs)."""
    stored = version.manifest["config"]["download"]["image_size"]
    if size and size > stored:
        raise ValueError(f"{what} takes {size}-pixel images but dataset {version.id} stores {stored}-pixel ones")


def _pinned(uri: str, tracking_uri: str | None, field: str, stage: str) -> tuple[str, dict, ModelBundle]:
    from mmcore import registry, tracking

    tracking_uri = tracking_uri or tracking.resolve_uri(TrackingConfig())
    try:
        name, number = registry.resolve_version(uri, tracking_uri)
    except ValueError as err:
        raise ValueError(f"{field}: {uri}: {err}") from None
    pinned = f"models:/{name}/{number}"
    bundle = registry.model_files(pinned, tracking_uri)
    config = json.loads(Path(bundle.config).read_text())
    if config.get("family") not in STAGES[stage].families:
        raise ValueError(f"{field}: {uri} ({pinned}) is a {config.get('family')} model, not a {stage} one")
    return pinned, config, bundle
