"""Derived versions: what a registered model computes over every row of a dataset version (an image
tokenizer's codes, a frozen tower's features, ...), computed once, stored beside the dataset and read by
every later run with the same pair instead of computing it again.

Layout, under the dataset version:
  derived/<kind>-<model name>-<version>/
    manifest.json          kind, dataset id, model URI and its weights' sha256, columns, per-shard sha256
    shards/<the dataset shard's name>.parquet   `key` + the derived columns, row for row and row group for
                                                row group the dataset shard's (a work unit reads both)

Each shard is written whole (renamed into place on a disk; one PUT in a bucket) before the next is
started, so a killed derivation goes on with the shards it has not written; the manifest is written last.
A derived version whose shard no longer matches its manifest is named and that shard computed again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcore import storage
from mmcore.console import say
from mmcore.data.dataset import DatasetVersion, file_digest
from mmcore.progress import progress_bar

MANIFEST = "manifest.json"
BATCH_ROWS = 64
"""Rows a model computes at once."""


@dataclass(frozen=True)
class Derivation:
    """What to compute over a dataset version: `kind` (a key of KINDS) by the registered model `model`
    (models:/name/version, pinned), whose bundle is at `bundle` on this machine; `options` are the kind's
    (a tower's layer), part of the derived version's name."""

    kind: str
    model: str
    bundle: Path
    options: tuple[tuple[str, int | str], ...] = ()

    @property
    def name(self) -> str:
        """The derived version's directory name: one per (kind, options, model version)."""
        name, _, version = self.model.removeprefix("models:/").rpartition("/")
        return "-".join([self.kind, *(f"{key}{value}" for key, value in self.options), name, version])

    def weights_sha256(self) -> str:
        from mmcore.bundle import ModelBundle

        return storage.sha256(Path(ModelBundle.at(self.bundle).weights))

    def computer(self) -> Callable[[pa.Table], dict[str, pa.Array]]:
        """What computes it, the model loaded: called on a dataset row group, it returns the derived columns."""
        return KINDS[self.kind](self.bundle, **dict(self.options))


def per_image(rows: pa.Table, compute: Callable[[list[bytes]], np.ndarray]) -> np.ndarray:
    """`compute` (a model on a list of encoded images) of each row's image, in batches of BATCH_ROWS, once per
    image: rows of one image (conversations about it) share its result."""
    import torch

    digests = rows.column("sha256").to_pylist()
    first = {digest: row for row, digest in reversed(list(enumerate(digests)))}  # each image's first row
    images = rows.column("image").take(sorted(first.values())).to_pylist()
    with torch.no_grad():
        out = [compute(images[i:i + BATCH_ROWS]) for i in range(0, len(images), BATCH_ROWS)]
    unique = {digest: k for k, digest in enumerate(sorted(first, key=first.get))}
    return np.concatenate(out)[[unique[d] for d in digests]]


def fixed_size_lists(values: np.ndarray) -> pa.Array:
    """(rows, ...) -> one fixed-size list of the row's values, flattened, per row."""
    flat = values.reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


class _Kind:
    """A kind of derived version: what it reads of a row (`columns`) and of which dataset kinds (`reads`), the
    capability (models.CAPABILITIES) a model needs for it; built from the model's bundle, called on a row
    group, it returns the derived columns."""

    columns = ["image", "sha256"]
    reads = ("captions", "instructions")
    needs = ""

    def __init__(self, bundle: Path):
        from mmcore.bundle import ModelBundle

        self.model, self.preprocess = ModelBundle.at(bundle).load()

    def pixels(self, blobs: list[bytes]):
        import torch

        return torch.from_numpy(self.preprocess.images(blobs))


class ImageCodes(_Kind):
    """An image tokenizer's codes of each row's image: `codes`, (grid * grid,) int16, from the image decoded
    and resized as its preprocessing does (the unified stage's, which takes it from the tokenizer)."""

    needs = "tokenize_image"

    def __call__(self, rows: pa.Table) -> dict[str, pa.Array]:
        codes = per_image(rows, lambda blobs: self.model.encode(self.pixels(blobs)).numpy())
        return {"codes": fixed_size_lists(codes.astype(np.int16))}


class ImageFeatures(_Kind):
    """A contrastive model's image tower's tokens at hidden state `layer` (VisionTower's index, from 0) of each
    row's image: `features`, (tokens * width,) float16, the image preprocessed as the model's (a fusion stage's
    frozen tower: its LM reads them)."""

    needs = "embed"

    def __init__(self, bundle: Path, layer: int):
        super().__init__(bundle)
        self.tower, self.layer = self.model.vision_tower(), layer

    def __call__(self, rows: pa.Table) -> dict[str, pa.Array]:
        features = per_image(rows, lambda blobs: self.tower(self.pixels(blobs), self.layer).numpy())
        return {"features": fixed_size_lists(features.astype(np.float16))}


class Embeddings(_Kind):
    """A contrastive model's unit-norm embeddings of each row's image and caption: `image_embedding`,
    `text_embedding`, (E,) float32 (what a nearest-neighbour index is built over)."""

    columns = ["image", "sha256", "caption"]
    reads = ("captions",)
    needs = "embed"

    def embeddings(self, rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        from mmcore.models.encode import embed_texts

        images = per_image(rows, lambda blobs: self.model.encode_image(self.pixels(blobs)).numpy())
        return images, embed_texts(self.model, self.preprocess, rows.column("caption").to_pylist(), BATCH_ROWS)

    def __call__(self, rows: pa.Table) -> dict[str, pa.Array]:
        images, texts = self.embeddings(rows)
        return {"image_embedding": fixed_size_lists(images.astype(np.float32)),
                "text_embedding": fixed_size_lists(texts.astype(np.float32))}


class ClipScore(Embeddings):
    """DataComp's CLIP score (Gadre et al. 2023) with a model of this pipeline's: `clip_score`, the cosine
    similarity of each row's image and caption embeddings (the ingest's model-score filter's score)."""

    def __call__(self, rows: pa.Table) -> dict[str, pa.Array]:
        images, texts = self.embeddings(rows)
        return {"clip_score": pa.array((images * texts).sum(-1).astype(np.float32))}


class Captions(_Kind):
    """A fusion or unified model's caption of each row's image: `generated_caption`, asked as evaluation's
    captioning asks (greedy, up to the model's context)."""

    needs = "generate"

    def __call__(self, rows: pa.Table) -> dict[str, pa.Array]:
        from mmcore.data.instruct import CAPTION_PROMPT
        from mmcore.models.encode import generate_answers

        def captions(blobs: list[bytes]) -> np.ndarray:
            return np.array(generate_answers(self.model, self.preprocess, blobs, [CAPTION_PROMPT] * len(blobs),
                                             max_new_tokens=self.preprocess.cfg.context_length), dtype=object)

        return {"generated_caption": pa.array(per_image(rows, captions).tolist(), pa.string())}


KINDS: dict[str, type[_Kind]] = {"image-codes": ImageCodes, "image-features": ImageFeatures,
                                 "embeddings": Embeddings, "clip-score": ClipScore, "captions": Captions}
"""kind -> the class that computes it: built from the model's bundle directory and the derivation's options,
called on a row group."""


def derived_path(version: DatasetVersion, derivation: Derivation):
    return version.path / "derived" / derivation.name


@dataclass
class DerivedVersion:
    """A finished derived version: its directory and manifest."""

    path: Path
    manifest: dict
    computed: int = 0
    """Shards the call that returned it computed (0: all were stored)."""

    def shard(self, dataset_shard) -> str:
        """The derived shard that goes row for row with the dataset shard at `dataset_shard`."""
        return str(self.path / "shards" / Path(str(dataset_shard)).name)

    def column(self, name: str) -> np.ndarray:
        """The derived column `name` of every row, in the dataset's row order (its shards' order): (rows, ...)."""
        values = [pq.read_table(self.shard(s["name"]), columns=[name]).column(name).to_numpy(zero_copy_only=False)
                  for s in self.manifest["shards"]]
        return np.concatenate([np.stack(v) if v.dtype == object else v for v in values])

    def problems(self) -> dict[str, str]:
        """Derived shard name -> what is wrong with it (missing, or not the file the manifest names)."""
        found = {}
        for shard in self.manifest["shards"]:
            path = self.path / "shards" / shard["name"]
            if not path.exists():
                found[shard["name"]] = "missing"
            elif file_digest(path) != {"sha256": shard["sha256"], "bytes": shard["bytes"]}:
                found[shard["name"]] = "sha256 or size differs from the manifest"
        return found


def stored(version: DatasetVersion) -> list[DerivedVersion]:
    """The finished derived versions beside a dataset version (those with a manifest)."""
    root = version.path / "derived"
    found = sorted(path for path in root.iterdir() if (path / MANIFEST).exists()) if root.exists() else []
    return [DerivedVersion(path, json.loads((path / MANIFEST).read_text())) for path in found]


def derive(version: DatasetVersion, derivation: Derivation,
           map_shards: Callable[[Derivation, list[dict]], Iterable[dict]] | None = None) -> DerivedVersion:
    """The derived version of `version` by `derivation`: the one stored beside the dataset when it is whole,
    else computed (only the shards that are missing or do not match; `map_shards(derivation, jobs)` computes
    the jobs, by default in this process: `derive_shards`), its manifest written last."""
    root = derived_path(version, derivation)
    weights = derivation.weights_sha256()
    existing = _opened(root, version, derivation, weights)
    problems = existing.problems() if existing is not None else {}
    if existing is not None and not problems:
        return existing
    done = _reusable(existing, problems, root, version)
    jobs = [{"source": str(path), "target": str(root / "shards" / path.name)}
            for path in version.shard_paths() if path.name not in done]
    say(f"computing {derivation.kind} of dataset {version.id} with {derivation.model}: {len(jobs)} of "
        f"{len(version.manifest['shards'])} shards, into {root}")
    (root / "shards").mkdir(parents=True, exist_ok=True)
    with progress_bar(f"{derivation.kind}", len(jobs)) as advance_to:
        for finished, shard in enumerate((map_shards or derive_shards)(derivation, jobs), 1):
            done[Path(shard["target"]).name] = shard
            advance_to(finished)
    shards = [{"name": path.name, **{k: done[path.name][k] for k in ("rows", "sha256", "bytes")}}
              for path in version.shard_paths()]
    manifest = {"kind": derivation.kind, "options": dict(derivation.options), "dataset_id": version.id,
                "model": derivation.model,
                "weights_sha256": weights, "columns": _columns(root / "shards" / shards[0]["name"]), "shards": shards}
    storage.write_text(root / MANIFEST, json.dumps(manifest, indent=2))
    return DerivedVersion(root, manifest, computed=len(jobs))


def _opened(root, version: DatasetVersion, derivation: Derivation, weights: str) -> DerivedVersion | None:
    """The derived version at `root` if its manifest is of this dataset and these weights; one of another
    (the same model version name in another registry, a dataset rewritten in place) is said and replaced."""
    if not (root / MANIFEST).exists():
        return None
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("dataset_id") == version.id and manifest.get("weights_sha256") == weights:
        return DerivedVersion(root, manifest)
    say(f"{root}: computed from other data or weights than dataset {version.id} and {derivation.model}; "
        "computing it again")
    storage.remove_tree(root)
    return None


def _reusable(existing: DerivedVersion | None, problems: dict[str, str], root,
              version: DatasetVersion) -> dict[str, dict]:
    """Shards already written and sound, by name: those the manifest vouches for less its `problems` (each
    named here: computed again), or (a derivation killed before its manifest) those on disk whose footer holds
    the dataset shard's rows in its row groups."""
    if existing is not None:
        for name, problem in problems.items():
            say(f"{root / 'shards' / name}: {problem}; computing it again")
        return {s["name"]: s for s in existing.manifest["shards"] if s["name"] not in problems}
    kept = {}
    for source in version.shard_paths():
        target = root / "shards" / source.name
        if target.exists() and _same_rows(source, target):
            kept[source.name] = {"target": str(target), "rows": pq.ParquetFile(str(source)).metadata.num_rows,
                                 **file_digest(target)}
    return kept


def _same_rows(source, target) -> bool:
    """Whether the derived shard `target` is readable and holds `source`'s row groups, row for row."""
    try:
        derived = pq.ParquetFile(str(target)).metadata
    except (OSError, pa.ArrowException):
        return False
    data = pq.ParquetFile(str(source)).metadata
    return derived.num_row_groups == data.num_row_groups and all(
        derived.row_group(g).num_rows == data.row_group(g).num_rows for g in range(data.num_row_groups))


def derive_shards(derivation: Derivation, jobs: list[dict]) -> Iterator[dict]:
    """Compute each job's derived shard here ({"source": dataset shard, "target": derived shard}), yielding
    each as written: {"target", "rows", "sha256", "bytes"}."""
    compute = derivation.computer()
    for job in jobs:
        yield write_shard(compute, job["source"], job["target"])


def write_shard(compute: Callable[[pa.Table], dict[str, pa.Array]], source: str, target: str) -> dict:
    """The derived shard of dataset shard `source`, row group for row group, written whole at `target`."""
    parquet = pq.ParquetFile(source)
    target_path = storage.path(target)
    # A name of this process's: ranks of a torchrun may derive at once (the same bytes).
    local = target_path.with_name(f".{target_path.name}.{os.getpid()}.tmp") if isinstance(target_path, Path) \
        else None
    writer = None
    for group in range(parquet.num_row_groups):
        rows = parquet.read_row_group(group, columns=["key", *compute.columns])
        table = pa.table({"key": rows.column("key"), **compute(rows)})
        if writer is None:
            writer = pq.ParquetWriter(str(local or target), table.schema)
        writer.write_table(table, row_group_size=table.num_rows)
    writer.close()
    if local is not None:
        local.replace(target_path)
    return {"target": target, "rows": parquet.metadata.num_rows, **file_digest(target_path)}


def _columns(shard) -> list[str]:
    return [name for name in pq.read_schema(str(shard)).names if name != "key"]
