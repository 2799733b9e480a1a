"""A dataset version filtered by what a registered model computed over it (a derived version's score, DataComp
style: Gadre et al. 2023): a new version of the rows kept, its rejects under reason `model_score`, its manifest
naming the parent version and the scoring model (`filtered_from`). Built in a staging directory and published
whole like an ingest's; a rule that keeps no row is refused before anything is written."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcore import storage
from mmcore.config import project_home
from mmcore.console import say
from mmcore.data.dataset import MANIFEST, DataCard, DatasetVersion, build_manifest, file_digest
from mmcore.data.derived import DerivedVersion
from mmcore.data.filters import keep_by_score
from mmcore.data.schema import read_shard
from mmcore.disk import staged


def filter_by_score(parent: DatasetVersion, derived: DerivedVersion, out: str, column: str = "clip_score",
                    threshold: float | None = None, top_fraction: float | None = None) -> DatasetVersion:
    """The dataset version at `out`: `parent`'s rows whose `column` of `derived` (a derived version of it) is at
    least `threshold`, or the `top_fraction` best over all splits; the others in its rejects.parquet."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of a threshold and a top fraction")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"top fraction {top_fraction}: must be in (0, 1]")
    if derived.manifest["dataset_id"] != parent.id or column not in derived.manifest["columns"]:
        raise ValueError(f"{derived.path}: not a derived version of dataset {parent.id} with a {column} column")
    target = check_new(out)
    scores = derived.column(column)
    keep, cut = keep_by_score(scores, threshold, top_fraction)
    rule = {"threshold": threshold} if threshold is not None else {"top_fraction": top_fraction}
    lineage = {"dataset_id": parent.id, "path": str(parent.path), "by": f"{derived.manifest['model']} {column} >= "
               f"{cut:.3f}", "model": derived.manifest["model"], "column": column, **rule, "lowest_kept": cut}
    details = [f"{column} {score:.3f} < {cut:.3f}" for score in scores]
    return _publish(parent, target, out, keep, "model_score", details, lineage)


def without_semantic_duplicates(parent: DatasetVersion, derived: DerivedVersion, out: str, threshold: float,
                                neighbours: int = 16) -> DatasetVersion:
    """The dataset version at `out`: `parent`'s rows less each whose image embedding (`derived`: an embeddings
    version of it) is at cosine `threshold` or more to an earlier kept row's (SemDeDup's rule, Abbas et al. 2023,
    greedy in row order), the nearest of each row found by usearch (`neighbours`, more while the farthest found is
    still that close): exactly up to EXACT_ROWS rows, by its HNSW index above."""
    from mmcore.search import EXACT_ROWS, vector_index

    if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold}: a cosine similarity in (0, 1]")
    if derived.manifest["dataset_id"] != parent.id or "image_embedding" not in derived.manifest["columns"]:
        raise ValueError(f"{derived.path}: not a derived version of dataset {parent.id} with image embeddings")
    target = check_new(out)
    vectors = derived.column("image_embedding")
    index = vector_index(vectors)
    exact = len(vectors) <= EXACT_ROWS  # HNSW's recall falls inside tight clusters of near-identical images
    found = index.search(vectors, neighbours + 1, exact=exact)
    keep, details = np.ones(len(vectors), bool), [""] * len(vectors)
    for row in range(len(vectors)):
        keys, distances = found.keys[row][:found.counts[row]], found.distances[row][:found.counts[row]]
        k = len(keys)
        while k < len(vectors) and 1 - distances[-1] >= threshold:  # more close neighbours than asked: widen
            k = min(2 * k, len(vectors))
            again = index.search(vectors[row], k, exact=exact)
            keys, distances = again.keys, again.distances
        for other, distance in zip(keys, distances):
            if other < row and keep[other] and 1 - distance >= threshold:
                keep[row], details[row] = False, f"image cosine {1 - distance:.3f} to row {other}"
                break
    lineage = {"dataset_id": parent.id, "path": str(parent.path), "model": derived.manifest["model"],
               "threshold": threshold, "by": f"{derived.manifest['model']} image embeddings, no two at cosine >= "
               f"{threshold}"}
    return _publish(parent, target, out, keep, "semantic_duplicate", details, lineage)


def random_subset(parent: DatasetVersion, out: str, rows: int, seed: int = 0) -> DatasetVersion:
    """The dataset version at `out`: `rows` of `parent`'s rows drawn at random over all splits (DataComp's baseline
    for a filter: the same number of rows, no model)."""
    if not 0 < rows <= parent.manifest["rows"]["kept"]:
        raise ValueError(f"a random subset of {rows} rows: dataset {parent.id} has {parent.manifest['rows']['kept']}")
    target = check_new(out)
    total = parent.manifest["rows"]["kept"]
    keep = np.zeros(total, bool)
    keep[np.random.default_rng(seed).permutation(total)[:rows]] = True
    lineage = {"dataset_id": parent.id, "path": str(parent.path), "rows": rows, "seed": seed,
               "by": f"a random {rows} of {total} rows (seed {seed})"}
    return _publish(parent, target, out, keep, "random_subset", [f"not drawn (seed {seed})"] * total, lineage)


def _publish(parent: DatasetVersion, target, out: str, keep: np.ndarray, reason: str, details: list[str],
             lineage: dict) -> DatasetVersion:
    """The version of `parent`'s rows `keep` says, built in a staging directory, then put at `target` whole."""
    train = np.concatenate([np.full(s["rows"], s["split"] == "train") for s in parent.manifest["shards"]])
    if not (keep & train).any():
        raise ValueError(f"{lineage['by']} keeps no row of dataset {parent.id}'s train split; nothing written")
    staging = (target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}" if isinstance(target, Path)
               else project_home() / "tmp" / f"filter-{uuid.uuid4().hex[:8]}")
    with staged(staging):
        _write(staging, parent, keep, reason, details, lineage)
        if isinstance(target, Path):
            os.rename(staging, target)
        else:
            storage.publish(staging, target, last=MANIFEST)
    version = DatasetVersion.open(out)
    rows = version.manifest["rows"]
    say(f"dataset {version.id}: kept {rows['kept']} of {rows['in']} rows of dataset {parent.id} ({lineage['by']}) "
        f"at {out}")
    return version


def check_new(out: str):
    """`out` as a storage path, refused when a dataset version (or anything, on a disk) is there."""
    storage.check(out)
    target = storage.path(out)
    if (target / MANIFEST).exists() or (isinstance(target, Path) and target.exists()):
        raise FileExistsError(f"{out} already exists; dataset versions are immutable, choose another --out")
    return target


def _write(staging: Path, parent: DatasetVersion, keep: np.ndarray, reason: str, details: list[str],
           lineage: dict) -> None:
    (staging / "shards").mkdir(parents=True)
    written, rejected, card, first = [], [], DataCard(parent.kind), 0
    for entry in parent.manifest["shards"]:
        table = read_shard(parent.path / entry["path"])
        mask = keep[first: first + table.num_rows]
        rejected += [{"row": first + int(row), "url": table.column("url")[row].as_py(),
                      "caption": table.column("caption")[row].as_py(), "reason": reason,
                      "detail": details[first + int(row)]} for row in np.flatnonzero(~mask)]
        first += table.num_rows
        kept = table.filter(pa.array(mask))
        if kept.num_rows:
            pq.write_table(kept, staging / entry["path"], row_group_size=256)
            card.add(kept)
            written.append({**{k: entry[k] for k in ("path", "split")}, "rows": kept.num_rows,
                            **file_digest(staging / entry["path"])})
    (staging / "tokenizer.json").write_bytes(parent.tokenizer_path.read_bytes())  # the parent's words: a superset
    pq.write_table(pa.Table.from_pylist(rejected, pa.schema([("row", pa.int64()), ("url", pa.string()),
                                                               ("caption", pa.string()), ("reason", pa.string()),
                                                               ("detail", pa.string())])), staging / "rejects.parquet")
    stats = {"in": int(len(keep)), "kept": int(keep.sum()), "rejected": {reason: int((~keep).sum())}}
    schema = read_shard(parent.path / parent.manifest["shards"][0]["path"]).schema
    manifest = build_manifest(staging, written, stats, parent.manifest["source"],
                              {**parent.manifest["config"], "filter": lineage}, schema,
                              parent.manifest["tokenizer"]["vocab_size"], card.summary())
    manifest["filtered_from"] = lineage
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
