"""A stage's parents in the registry: pinned from aliases to versions and checked against the
dataset before any worker starts, so a re-run resumes the same thing even if an alias moved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mmcore import tracking
from mmcore.config import STAGE_PARENTS, RunConfig
from mmcore.data.dataset import DatasetVersion
from mmcore.data.tokenizer import load_tokenizer
from mmcore.models import PARENT_PARTS, STAGE_FAMILIES


@dataclasses.dataclass
class Parents:
    cfg: RunConfig
    """The run config with model.parent (and model.lm_parent) pinned to models:/name/version."""
    arch: dict
    """The architecture with the parent's part in it (PARENT_PARTS)."""
    tags: dict[str, str]
    """parent_model (and lm_parent_model) = name/version, for the registered version."""


def check_family(cfg: RunConfig, arch: dict) -> None:
    families = STAGE_FAMILIES[cfg.task.stage]
    if arch.get("family") not in families:
        raise ValueError(f"model.name: {cfg.model.name} is a {arch.get('family')} model; the {cfg.task.stage} "
                         f"stage trains {' or '.join(families)} models")


def pin_parents(cfg: RunConfig, arch: dict, tracking_uri: str, version: DatasetVersion) -> Parents:
    """Resolve and check model.parent / model.lm_parent; clear errors name the URI and the misfit."""
    check_family(cfg, arch)
    own_size = arch.get("image_size") or arch.get("vision", {}).get("image_size")  # fusion: the parent's, below
    _check_image_size(f"model.name: {cfg.model.name}", own_size, version)
    if not cfg.model.parent:
        return Parents(cfg, arch, {})
    if cfg.task.stage not in PARENT_PARTS:
        raise ValueError(f"model.parent: the {cfg.task.stage} stage builds on no registered model")
    part, same_text = PARENT_PARTS[cfg.task.stage]
    parent_stage, _ = STAGE_PARENTS[cfg.task.stage]
    parent, parent_cfg, bundle = _pinned(cfg.model.parent, tracking_uri, "model.parent", parent_stage)
    if same_text:
        _check_tokenizer(parent, Path(bundle.tokenizer), version)
    _check_image_size(f"model.parent: {parent}", json.loads(Path(bundle.preprocess).read_text())["image_size"],
                      version)
    arch = {**arch, **part(parent_cfg)}
    model = dataclasses.replace(cfg.model, parent=parent)
    tags = {"parent_model": parent.removeprefix("models:/")}
    if cfg.model.lm_parent:
        lm_parent, lm_cfg, _ = _pinned(cfg.model.lm_parent, tracking_uri, "model.lm_parent", "fusion")
        if lm_cfg.get("lm") != arch.get("lm"):
            raise ValueError(f"model.lm_parent: {lm_parent}'s language model {lm_cfg.get('lm')} differs from "
                             f"{cfg.model.name}'s {arch.get('lm')}")
        model = dataclasses.replace(model, lm_parent=lm_parent)
        tags["lm_parent_model"] = lm_parent.removeprefix("models:/")
    return Parents(dataclasses.replace(cfg, model=model), arch, tags)


def _check_image_size(what: str, size: int | None, version: DatasetVersion) -> None:
    """A model must not take larger images than the dataset stores (they would be upscaled blurs)."""
    stored = version.manifest["config"]["download"]["image_size"]
    if size and size > stored:
        raise ValueError(f"{what} takes {size}-pixel images but dataset {version.id} stores {stored}-pixel ones")


def _pinned(uri: str, tracking_uri: str, field: str, stage: str) -> tuple[str, dict, tracking.ModelBundle]:
    try:
        name, number = tracking.resolve_version(uri, tracking_uri)
    except ValueError as err:
        raise ValueError(f"{field}: {uri}: {err}") from None
    pinned = f"models:/{name}/{number}"
    bundle = tracking.model_files(pinned, tracking_uri)
    config = json.loads(Path(bundle.config).read_text())
    if config.get("family") not in STAGE_FAMILIES[stage]:
        raise ValueError(f"{field}: {uri} ({pinned}) is a {config.get('family')} model, not a {stage} one")
    return pinned, config, bundle


def _check_tokenizer(parent: str, tokenizer_path: Path, version: DatasetVersion) -> None:
    theirs = load_tokenizer(tokenizer_path).get_vocab()
    ours = load_tokenizer(version.tokenizer_path).get_vocab()
    if theirs != ours:
        raise ValueError(f"model.parent: {parent} was trained with another tokenizer ({len(theirs)} tokens) than "
                         f"dataset {version.id}'s ({len(ours)} tokens); train one on this dataset first")
