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
    with pytest.raises(ValueError, match=r"\(models:/mmpipe-image-tokenizer/\d+\) is a vq model, which computes "
                                         r"codes; embeddings needs a model that can embed"):
        infer(f"models:/{image_tokenizer.model_name}@candidate", str(train_dataset.path), "embeddings", "here")
    with pytest.raises(ValueError, match=f"dataset {train_chats.id} holds instructions; clip-score reads a dataset "
                                         "of captions"):
        infer(f"models:/{trained.model_name}@candidate", str(train_chats.path), "clip-score", "here")
    with pytest.raises(ValueError, match="--output 'logits': one of embeddings, clip-score, codes, captions"):
        infer(f"models:/{trained.model_name}@candidate", str(train_dataset.path), "logits", "here")
    assert not [d for d in stored(train_dataset) if d.manifest["kind"] == "embeddings"]


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
