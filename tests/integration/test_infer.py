"""`mmpipe infer`: a registered model over every row of a dataset version, kept as a derived version beside it
(data/derived.py), on Ray Data actors or in this process."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from mmcore.bundle import ModelBundle
from mmcore.cli import cmd_infer
from mmcore.data.derived import Derivation, derive, stored
from mmcore.data.filters import ModelScoreFilter
from mmcore.data.instruct import CAPTION_PROMPT
from mmcore.infer import infer
from mmcore.models import build_model_for, model_config
from mmcore.models.encode import generate_answers
from mmcore.registry import load_model
from mmcore.stages import STAGES

pytestmark = pytest.mark.integration


def column(derived, name: str) -> list:
    return [value for s in derived.manifest["shards"]
            for value in pq.read_table(derived.shard(s["name"]), columns=[name]).column(name).to_pylist()]


def test_clip_scores_are_computed_once_on_ray_and_are_the_ingest_filters(trained, train_dataset, capsys):
    uri = f"models:/{trained.model_name}@candidate"
    args = argparse.Namespace(uri=uri, dataset=str(train_dataset.path), output="clip-score", executor="ray",
                              ray_address="")
    capsys.readouterr()
    assert cmd_infer(args) == 0
    out = capsys.readouterr().out
    shards = len(train_dataset.manifest["shards"])
    assert f"computing clip-score of dataset {train_dataset.id} with {trained.model_uri}" in out
    assert f"{shards} computed, 0 stored before" in out and "clip_score" in out and "p50" in out
    derived = next(d for d in stored(train_dataset) if d.manifest["kind"] == "clip-score")
    assert derived.manifest["model"] == trained.model_uri  # the alias pinned to its version

    # DataComp's CLIP score: the ingest's model-score filter's, row for row.
    model, preprocess = load_model(uri)
    rows = [pq.read_table(str(path), columns=["image", "caption"]) for path in train_dataset.shard_paths()]
    expected = np.concatenate([ModelScoreFilter(model, preprocess).scores(table) for table in rows])
    np.testing.assert_allclose(column(derived, "clip_score"), expected, atol=1e-5)

    assert cmd_infer(args) == 0
    out = capsys.readouterr().out
    assert "computing" not in out and f"0 computed, {shards} stored before" in out


def test_a_model_without_the_capability_or_a_dataset_it_cannot_read_is_refused_before_any_work(
        trained, image_tokenizer, train_dataset, train_chats):
    def written():  # every derived directory, finished or not
        return sorted(p for v in (train_dataset, train_chats) for p in v.path.glob("derived/*"))

    before = written()
    with pytest.raises(ValueError, match=r"\(models:/mmpipe-image-tokenizer/\d+\) is a vq model, which computes "
                                         r"codes; embeddings needs a model that can embed"):
        infer(f"models:/{image_tokenizer.model_name}@candidate", str(train_dataset.path), "embeddings", "here")
    with pytest.raises(ValueError, match=f"dataset {train_chats.id} holds instructions; clip-score reads a dataset "
                                         "of captions"):
        infer(f"models:/{trained.model_name}@candidate", str(train_chats.path), "clip-score", "here")
    with pytest.raises(ValueError, match="--output 'logits': one of embeddings, clip-score, codes, captions"):
        infer(f"models:/{trained.model_name}@candidate", str(train_dataset.path), "logits", "here")
    # Nothing written: the session's datasets hold the derived versions of earlier tests only.
    assert written() == before


def test_embeddings_are_unit_norm_and_captions_are_written_once_per_image(trained, train_chats, train_dataset,
                                                                          tmp_path):
    derived, _ = infer(f"models:/{trained.model_name}@candidate", str(train_dataset.path), "embeddings", "here")
    images = np.array(column(derived, "image_embedding"))
    texts = np.array(column(derived, "text_embedding"))
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert images.shape == texts.shape == (train_dataset.manifest["rows"]["kept"], images.shape[1])

    # A fusion model's captions (a fresh LLaVA on a fresh tower): the same for the conversations about one image.
    torch.manual_seed(0)
    tokenizer_json = train_chats.tokenizer_path.read_text()
    arch = {**model_config("llava-debug"), **STAGES["fusion"].parent.takes(model_config("clip-debug"))}
    tokenizer_json = STAGES["fusion"].task.tokenizer(tokenizer_json, arch)
    llava, preprocess = build_model_for(arch, Tokenizer.from_str(tokenizer_json))
    bundle = ModelBundle.write(tmp_path / "llava", llava, arch, tokenizer_json, preprocess).directory
    captions = derive(train_chats, Derivation("captions", "models:/mmpipe-fusion/7", bundle))
    written = column(captions, "generated_caption")
    digests = [d for path in train_chats.shard_paths() for d in pq.read_table(str(path), columns=["sha256"])
               .column("sha256").to_pylist()]
    by_image = {}
    for digest, caption in zip(digests, written):
        assert by_image.setdefault(digest, caption) == caption
    assert len(by_image) < len(written)
    model, pre = ModelBundle.at(bundle).load()
    first = pq.read_table(str(train_chats.shard_paths()[0]), columns=["image"]).column("image").to_pylist()[:4]
    asked = generate_answers(model, pre, first, [CAPTION_PROMPT] * 4, max_new_tokens=pre.cfg.context_length)
    assert written[:4] == asked and any(asked), "the model's own captions"


def test_filtering_by_clip_score_makes_a_version_of_the_best_scored_rows_that_names_its_model(
        trained, train_dataset, tmp_path, capsys):
    """`mmpipe dataset filter D --model M --top-fraction F --out D2`: DataComp's rule over the derived CLIP score;
    counts add up, the rejects carry the reason, the manifest names the parent version and the scoring model."""
    from mmcore.cli import cmd_dataset_filter
    from mmcore.data.dataset import DatasetVersion

    def filtered(out, threshold=None, top_fraction=None, by="clip-score"):
        return cmd_dataset_filter(argparse.Namespace(
            dir=str(train_dataset.path), model=f"models:/{trained.model_name}@candidate", by=by, seed=0,
            threshold=threshold, top_fraction=top_fraction, out=str(out), executor="here"))

    assert filtered(tmp_path / "best", top_fraction=0.7) == 0
    assert "filtered from" in capsys.readouterr().out
    kept = DatasetVersion.open(tmp_path / "best")
    assert kept.verify() == []
    rows, total = kept.manifest["rows"], train_dataset.manifest["rows"]["kept"]
    assert rows["in"] == total and rows["kept"] == int(np.ceil(0.7 * total))
    assert rows["kept"] + rows["rejected"]["model_score"] == total
    lineage = kept.manifest["filtered_from"]
    assert lineage["dataset_id"] == train_dataset.id and lineage["model"] == trained.model_uri

    derived = next(d for d in stored(train_dataset) if d.manifest["kind"] == "clip-score")
    keys = [k for path in train_dataset.shard_paths() for k in pq.read_table(str(path), columns=["key"])
            .column("key").to_pylist()]
    score = dict(zip(keys, column(derived, "clip_score")))
    ours = {k for path in kept.shard_paths()
            for k in pq.read_table(str(path), columns=["key"]).column("key").to_pylist()}
    assert min(score[k] for k in ours) >= lineage["lowest_kept"] >= max(score[k] for k in set(keys) - ours)
    rejects = pq.read_table(str(kept.path / "rejects.parquet")).to_pylist()
    assert len(rejects) == rows["rejected"]["model_score"] and {r["reason"] for r in rejects} == {"model_score"}
    assert sum(kept.manifest["splits"].values()) == rows["kept"]

    # DataComp's baseline: a random subset of the same size.
    assert filtered(tmp_path / "random", top_fraction=rows["kept"] / total, by="random") == 0
    drawn = DatasetVersion.open(tmp_path / "random")
    assert drawn.verify() == [] and drawn.manifest["rows"]["kept"] == rows["kept"]
    assert drawn.manifest["rows"]["rejected"] == {"random_subset": total - rows["kept"]}
    assert drawn.manifest["filtered_from"]["by"] == f"a random {rows['kept']} of {total} rows (seed 0)"
    assert {k for path in drawn.shard_paths()
            for k in pq.read_table(str(path), columns=["key"]).column("key").to_pylist()} != ours

    # Retrained on the filtered version: the model's lineage names the scoring model and the parent version.
    from mmcore.config import TrackingConfig
    from mmcore.registry import lineage
    from mmcore.tracking import resolve_uri
    from mmcore.train.fit import fit
    from tests.integration.conftest import debug_config
    from tests.integration.workers import HERE

    retrained = fit(debug_config(kept, "optim.max_steps=10", 'tracking.model_name="mmpipe-filtered"', *HERE))
    links = {link["kind"]: link for link in lineage(retrained.model_uri, resolve_uri(TrackingConfig()))}
    assert links["dataset"]["name"] == kept.id and links["filtered from dataset"]["name"] == train_dataset.id
    assert links["filtered from dataset"]["by"].startswith(f"{trained.model_uri} clip_score >= ")
    assert links["url list"]["name"] == train_dataset.manifest["source"]["path"]

    with pytest.raises(ValueError, match="keeps no row of dataset .*; nothing written"):
        filtered(tmp_path / "none", threshold=2.0)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none*"))
    with pytest.raises(FileExistsError, match="already exists"):
        filtered(tmp_path / "best", threshold=0.0)


def test_semantic_duplicates_are_dropped_once_each_keeping_the_first(trained, train_dataset, tmp_path):
    """`dataset filter --by semantic-duplicates --threshold T`: a row goes when its image embedding is at cosine T
    or more to an earlier kept row's; no two kept rows are that close; counts add up under the reason."""
    from mmcore.cli import cmd_dataset_filter
    from mmcore.data.dataset import DatasetVersion

    derived, _ = infer(f"models:/{trained.model_name}@candidate", str(train_dataset.path), "embeddings", "here")
    vectors = np.array(column(derived, "image_embedding"))
    similar = vectors @ vectors.T
    threshold = float(np.quantile(similar[np.triu_indices(len(vectors), 1)], 0.999))  # a few hundred close pairs
    assert cmd_dataset_filter(argparse.Namespace(
        dir=str(train_dataset.path), model=f"models:/{trained.model_name}@candidate", by="semantic-duplicates",
        seed=0, threshold=threshold, top_fraction=None, out=str(tmp_path / "deduped"), executor="here")) == 0
    deduped = DatasetVersion.open(tmp_path / "deduped")
    rows = deduped.manifest["rows"]
    assert deduped.verify() == [] and 0 < rows["rejected"]["semantic_duplicate"] < rows["in"] // 2
    assert rows["kept"] + rows["rejected"]["semantic_duplicate"] == rows["in"] == len(vectors)
    dropped = {r["row"]: r["detail"] for r in pq.read_table(str(deduped.path / "rejects.parquet")).to_pylist()}
    kept = np.array([row not in dropped for row in range(len(vectors))])
    for row, detail in dropped.items():
        earlier = int(detail.rsplit(" ", 1)[1])
        assert earlier < row and kept[earlier] and similar[row, earlier] >= threshold - 1e-5
    close = similar[np.ix_(kept, kept)] >= threshold + 1e-5
    np.fill_diagonal(close, False)
    assert not close.any(), "no two kept rows are duplicates"


def test_search_returns_the_nearest_rows_by_text_or_image_and_draws_them(trained, train_dataset, train_chats,
                                                                         tmp_path, monkeypatch, capsys):
    """`mmpipe search QUERY --dataset D --model M`: the k rows whose image embeddings are nearest the query's (as
    numpy finds them over the derived embeddings), a table and a contact sheet; an image as the query finds
    itself; above EXACT_ROWS an HNSW index is built once and kept."""
    from PIL import Image

    from mmcore import search as searching
    from mmcore.cli import cmd_search
    from mmcore.models.encode import embed_texts

    uri = f"models:/{trained.model_name}@candidate"
    first = pq.read_table(str(train_dataset.shard_paths("train")[0]), columns=["caption", "image"])
    text = first.column("caption")[0].as_py()
    capsys.readouterr()
    args = argparse.Namespace(query=text, dataset=str(train_dataset.path), model=uri, k=5, executor="here",
                              out=str(tmp_path / "sheet.png"))
    assert cmd_search(args) == 0
    out = capsys.readouterr().out
    assert f"contact sheet: {tmp_path / 'sheet.png'}" in out and "score" in out

    derived = next(d for d in stored(train_dataset) if d.manifest["kind"] == "embeddings")
    images = derived.column("image_embedding")
    model, preprocess = load_model(uri)
    cosines = images @ embed_texts(model, preprocess, [text])[0]
    result = searching.search(text, str(train_dataset.path), uri, k=5, executor="here", out=str(tmp_path / "a.png"))
    assert [hit["row"] for hit in result.hits] == list(np.argsort(-cosines, kind="stable")[:5])
    np.testing.assert_allclose([hit["score"] for hit in result.hits], np.sort(cosines)[::-1][:5], atol=1e-5)
    assert result.model == trained.model_uri and [hit["rank"] for hit in result.hits] == [1, 2, 3, 4, 5]
    with Image.open(tmp_path / "sheet.png") as sheet:  # 5 hits: two rows of four thumbnails under the query
        assert sheet.size == (4 * (searching.THUMB + 16), 40 + 2 * (searching.THUMB + 64))

    query = tmp_path / "query.png"
    query.write_bytes(first.column("image")[0].as_py())
    found = searching.search(str(query), str(train_dataset.path), uri, k=3, executor="here")
    assert found.hits[0]["score"] > 0.999 and found.hits[0]["image"] == query.read_bytes()
    assert found.sheet.name == f"{train_dataset.id}-query.png" and found.sheet.exists()

    monkeypatch.setattr(searching, "EXACT_ROWS", 10)  # the HNSW index: the same rows, its file kept for next time
    again = searching.search(text, str(train_dataset.path), uri, k=5, executor="here", out=str(tmp_path / "b.png"))
    assert [hit["row"] for hit in again.hits] == [hit["row"] for hit in result.hits]
    assert len(list((searching.project_home() / "indexes").glob(f"{train_dataset.id}-*.usearch"))) == 1

    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.txt: not an image the model can read"):
        searching.search(str(tmp_path / "notes.txt"), str(train_dataset.path), uri, executor="here")
    with pytest.raises(ValueError, match=f"dataset {train_chats.id} holds instructions; embeddings reads a dataset"):
        searching.search(text, str(train_chats.path), uri, executor="here")
