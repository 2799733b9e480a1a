"""What a training run is before anything runs it (no Ray, no MLflow): its dataset checked, its name,
the stage's tokenizer and preprocessing, and the work units each split is read in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mmcore.config import RunConfig, to_dict
from mmcore.data.dataset import DatasetError, DatasetVersion
from mmcore.data.schema import open_shard
from mmcore.data.tokenizer import load_tokenizer
from mmcore.data.units import train_units, work_units
from mmcore.models.preprocess import PreprocessConfig, Preprocessor
from mmcore.stages import STAGES
from mmcore.tasks import Parents, build_task


def open_dataset(cfg: RunConfig) -> DatasetVersion:
    """Every data problem is found here, before any worker starts: in data.dataset (returned) and in each version
    data.mix adds."""
    version = _checked(cfg, cfg.data.dataset)
    for path in cfg.data.mix:
        _checked(cfg, path)
    if version.manifest["splits"]["train"] < cfg.data.batch_size:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is larger than the train split "
                         f"({version.manifest['splits']['train']} rows) of {version.path}")
    return version


def _checked(cfg: RunConfig, path: str) -> DatasetVersion:
    version = DatasetVersion.open(path)
    if not version.tokenizer_path.exists():
        raise DatasetError(f"{version.tokenizer_path}: the dataset's tokenizer is missing")
    load_tokenizer(version.tokenizer_path)
    problems = version.verify() if cfg.data.verify else []
    if problems:
        raise DatasetError(f"{version.path} fails verification ({len(problems)} problem(s)): "
                           + "; ".join(problems[:5]))
    if not cfg.data.verify:  # verify() read every shard already; without it, each footer and schema
        for shard in version.shard_paths():
            open_shard(shard)
    reads = STAGES[cfg.task.stage].reads
    if version.kind not in reads:
        raise DatasetError(f"{version.path} is a dataset of {version.kind}; the {cfg.task.stage} stage trains on "
                           f"{' or '.join(reads)}")
    main = path == cfg.data.dataset
    for split in ("train", "val"):
        if not version.shard_paths(split) and (split == "train" or (main and cfg.data.val_batches)):
            raise DatasetError(f"{version.path}: the {split} split is empty")
    return version


def run_name(cfg: RunConfig, dataset_id: str, arch: dict) -> str:
    """Stable across re-runs of the same command, also after an upgrade that adds config fields: the name hashes
    the fields that differ from their defaults; cluster and tracking settings do not change it, the architecture
    does (an edited models/configs file starts a new run instead of resuming the old one)."""
    identity = {**{k: v for k, v in _changed(cfg).items() if k not in ("cluster", "tracking")}, "arch": arch}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.recipe}-{cfg.task.stage}-{dataset_id[:8]}-{digest}"


def _changed(config) -> dict:
    """A config's fields that differ from its class's defaults, sections field by field."""
    default, changed = type(config)(), {}
    for field in dataclasses.fields(config):
        value, base = getattr(config, field.name), getattr(default, field.name)
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(base):
            if part := _changed(value):
                changed[field.name] = part
        elif value != base:  # a section where the default has none is whole
            changed[field.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return changed


@dataclass
class Plan:
    """The stage's tokenizer and preprocessing, and the units of each split, for every rank."""

    tokenizer_json: str
    """The stage's tokenizer (its Task's `tokenizer` of the dataset's), saved with the model."""
    preprocess: PreprocessConfig
    train_units: list[dict]
    """Every epoch's units of the train split; each rank streams its share (units.rank_units)."""
    train_preprocess: Preprocessor
    val_units: list[dict] | None
    """The val split's units; None without validation (data.val_batches 0, or a split under a batch a rank)."""
    val_preprocess: Preprocessor
    skipped_validation: str = ""
    """Why there is no validation although data.val_batches asks for it."""


def plan(cfg: RunConfig, version: DatasetVersion, arch: dict, ranks: int, parents: Parents | None = None,
         map_shards=None, captioner: Path | None = None) -> Plan:
    """Each rank streams its own share of the train split, so that a resumed run goes on at the row where
    its checkpoint was taken (epochs: as many as max_steps needs, one more for the ranks' uneven shares).
    Validation reads the first val_batches batches of its share of the val split, the same rows every time.
    What the stage reads from derived versions (its Task's `derivations`; data.captioner's captions, its bundle
    at `captioner`) is computed first where it is not stored yet, by `map_shards` (derived.derive's)."""
    task_class = STAGES[cfg.task.stage].task
    tokenizer_json = task_class.tokenizer(version.tokenizer_path.read_text(), arch, parents)
    _, preprocess = build_task(cfg, arch, tokenizer_json)
    pre = task_class.preprocessor(cfg, preprocess, tokenizer_json, parents)
    sources = [(version, 1 - sum(cfg.data.mix.values())),
               *((DatasetVersion.open(path), weight) for path, weight in cfg.data.mix.items())]
    derived = _derived(cfg, task_class, arch, parents, [source for source, _ in sources], map_shards)
    val_units, skipped = (work_units(version, "val") if cfg.data.val_batches else None), ""
    val_rows, one_each = version.manifest["splits"].get("val", 0), cfg.micro_batch * ranks
    if val_units and val_rows < one_each:
        val_units, skipped = None, (f"the val split's {val_rows} rows are fewer than a batch of {cfg.micro_batch} "
                                    f"for each of {ranks} workers")
    units = train_units(sources, cfg.optim.max_steps * cfg.data.batch_size, cfg.seed,
                        grain=max(1, cfg.micro_batch // len(sources)))  # a mix: every micro-batch holds each version
    if derived:
        units = [{**unit, "derived": derived[unit["source"]].shard(unit["path"])} for unit in units]
        val_units = val_units and [{**unit, "derived": derived[0].shard(unit["path"])} for unit in val_units]
    if cfg.data.captioner:  # the train split's captions, some or all (validation reads the dataset's)
        captions = _captions(cfg, captioner, [source for source, _ in sources], map_shards)
        units = [{**unit, "captions": captions[unit["source"]].shard(unit["path"]) if captions[unit["source"]]
                  else "", "generated_share": cfg.data.generated_share} for unit in units]
    return Plan(tokenizer_json, preprocess, units,
                pre.for_split("train", cfg.data.augment), val_units, pre.for_split("val", False), skipped)


def _captions(cfg: RunConfig, captioner: Path, versions: list[DatasetVersion], map_shards) -> list:
    """data.captioner's caption of every row of each caption dataset (None for an instruction dataset)."""
    from mmcore.data.derived import Derivation, derive

    derivation = Derivation("captions", cfg.data.captioner, captioner)
    return [derive(version, derivation, map_shards) if version.kind == "captions" else None for version in versions]


def _derived(cfg: RunConfig, task_class, arch: dict, parents: Parents | None, versions: list[DatasetVersion],
             map_shards):
    """Each version's derived version the stage reads (none, or one each), computed where not stored yet."""
    from mmcore.data.derived import derive

    derivations = task_class.derivations(cfg, arch, parents) if hasattr(task_class, "derivations") else []
    assert len(derivations) <= 1, "a stage reads one derived version of each dataset"
    return [derive(version, derivations[0], map_shards) for version in versions] if derivations else []
