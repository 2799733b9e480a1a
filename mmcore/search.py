"""Search a dataset version by text or by image: the nearest rows to the query in a contrastive model's embedding
space, from the derived `embeddings` version of (dataset version, model) (computed the first time, kept beside the
dataset), with usearch; printed as a table and drawn as a contact sheet. `mmpipe search` calls `search`."""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcore.config import project_home
from mmcore.data.dataset import DatasetVersion
from mmcore.data.derived import DerivedVersion
from mmcore.data.schema import read_shard

EXACT_ROWS = 200_000
"""Up to this many rows a search compares the query with every row (usearch's brute force, SIMD); above, it asks
an HNSW index, built once per derived version and kept under <home>/indexes."""
SHEET_COLUMNS = 4
THUMB = 160
"""A contact sheet's columns, and each image's side in pixels."""


@dataclass
class SearchResult:
    query: str
    model: str
    """The model that embedded the query and the rows, pinned (models:/name/version)."""
    dataset_id: str
    hits: list[dict]
    """The nearest rows, best first: rank, score (cosine), row (in the dataset's order), split, key, caption, and
    the image's bytes."""
    sheet: Path | None = None


def vector_index(vectors: np.ndarray):
    """A usearch index (cosine, float32: its default bf16 misjudges near neighbours) of `vectors`, keys their
    rows; built on one thread, so the same vectors make the same graph."""
    from usearch.index import Index

    index = Index(ndim=vectors.shape[1], metric="cos", dtype="f32")
    index.add(np.arange(len(vectors)), vectors.astype(np.float32), threads=1)
    return index


@dataclass
class Searchable:
    """A dataset version's rows by one model's image embeddings, ready for queries: the derived embeddings read and
    the model loaded once, however many queries follow (the retrain flow's search_queries)."""

    version: DatasetVersion
    derived: DerivedVersion
    model: object
    preprocess: object

    @classmethod
    def open(cls, dataset: str, model: str = "models:/mmpipe-contrastive@champion", executor: str = "ray",
             ray_address: str = "") -> "Searchable":
        """The dataset version at `dataset` by `model`'s embeddings, computed the first time (mmpipe infer)."""
        from mmcore import registry, tracking
        from mmcore.bundle import ModelBundle
        from mmcore.config import TrackingConfig
        from mmcore.infer import infer

        derived, _ = infer(model, dataset, "embeddings", executor, ray_address)
        bundle = registry.model_files(derived.manifest["model"], tracking.resolve_uri(TrackingConfig()))
        return cls(DatasetVersion.open(dataset), derived, *ModelBundle.at(bundle.directory).load())

    @functools.cached_property
    def images(self) -> np.ndarray:
        return self.derived.column("image_embedding")

    def search(self, query: str, k: int = 8, out: str | None = None) -> SearchResult:
        """The `k` rows nearest to `query` (text, or the path of an image file), and their contact sheet at `out`
        (default <home>/search/<dataset id>-<query>.png)."""
        if k < 1:
            raise ValueError(f"--k {k}: at least 1")
        vector = _embed_query(self.model, self.preprocess, query)
        keys, scores = _nearest(self.images, vector, min(k, len(self.images)), self.derived)
        hits = [{"rank": rank + 1, "score": float(score), **row}
                for rank, (score, row) in enumerate(zip(scores, _rows(self.version, keys)))]
        result = SearchResult(query, self.derived.manifest["model"], self.version.id, hits)
        result.sheet = contact_sheet(result, Path(out) if out else project_home() / "search" /
                                     f"{self.version.id}-{slug(query)}.png")
        return result


def search(query: str, dataset: str, model: str = "models:/mmpipe-contrastive@champion", k: int = 8,
           executor: str = "ray", out: str | None = None, ray_address: str = "") -> SearchResult:
    """The `k` rows of the dataset version at `dataset` nearest to `query` (text, or the path of an image file)
    by `model`'s embeddings, and their contact sheet at `out` (default <home>/search/<dataset id>-<query>.png)."""
    if k < 1:
        raise ValueError(f"--k {k}: at least 1")
    return Searchable.open(dataset, model, executor, ray_address).search(query, k, out)


def _embed_query(model, preprocess, query: str) -> np.ndarray:
    import torch

    from mmcore.models.encode import embed_texts

    path = Path(query).expanduser()
    if not path.is_file():
        return embed_texts(model, preprocess, [query])[0]
    try:
        pixels = torch.from_numpy(preprocess.images([path.read_bytes()]))
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not an image the model can read ({err})") from None
    with torch.no_grad():
        return model.encode_image(pixels)[0].numpy()


def _nearest(vectors: np.ndarray, query: np.ndarray, k: int, derived: DerivedVersion) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cosines) of the `k` vectors nearest to `query`, best first."""
    from usearch.index import Index, search as brute_force

    query = query.astype(np.float32)
    if len(vectors) <= EXACT_ROWS:
        found = brute_force(vectors.astype(np.float32), query, k, "cos", exact=True)
    else:
        path = project_home() / "indexes" / f"{derived.manifest['dataset_id']}-{derived.path.name}.usearch"
        if path.exists():
            index = Index.restore(str(path))
        else:
            index = vector_index(vectors)
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save(str(path.with_suffix(".partial")))
            path.with_suffix(".partial").rename(path)
        found = index.search(query, k)
    return np.asarray(found.keys, np.int64), 1 - np.asarray(found.distances, np.float64)


def _rows(version: DatasetVersion, wanted: np.ndarray) -> list[dict]:
    """The dataset's rows at `wanted` (indices in the manifest's shard order), in that order."""
    found, first = {}, 0
    for entry in version.manifest["shards"]:
        mine = [int(row) - first for row in wanted if first <= row < first + entry["rows"]]
        if mine:
            table = read_shard(version.path / entry["path"], ["key", "caption", "image"]).take(mine)
            for row, values in zip(mine, table.to_pylist()):
                found[first + row] = {"row": first + row, "split": entry["split"], **values}
        first += entry["rows"]
    return [found[int(row)] for row in wanted]


def contact_sheet(result: SearchResult, path: Path) -> Path:
    """A PNG of the hits' images, best first, each with its rank, score and caption; the query on top."""
    import textwrap

    from PIL import Image, ImageDraw, ImageOps

    rows = -(-len(result.hits) // SHEET_COLUMNS)
    cell_w, cell_h, top = THUMB + 16, THUMB + 64, 40
    sheet = Image.new("RGB", (cell_w * SHEET_COLUMNS, top + cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), f"{result.query[:80]}  ({result.model}, dataset {result.dataset_id})", fill="black")
    for i, hit in enumerate(result.hits):
        x, y = cell_w * (i % SHEET_COLUMNS) + 8, top + cell_h * (i // SHEET_COLUMNS)
        with Image.open(io.BytesIO(hit["image"])) as image:  # small images scaled up too
            sheet.paste(ImageOps.contain(image.convert("RGB"), (THUMB, THUMB)), (x, y))
        lines = [f"#{hit['rank']}  {hit['score']:.3f}  row {hit['row']}", *textwrap.wrap(hit["caption"], 26)[:3]]
        draw.multiline_text((x, y + THUMB + 4), "\n".join(lines), fill="black", spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def slug(query: str) -> str:
    """A file name's part for a query: its words (an image query: its file's stem), lowercase, dashed."""
    return re.sub(r"[^a-z0-9]+", "-", Path(query).stem.lower() if Path(query).is_file() else query.lower())[:48] \
        .strip("-") or "query"
