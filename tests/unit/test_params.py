"""Flow parameters: what the Prefect form refuses, and the configs they turn into."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.params import IngestParams, RetrainParams, TrainParams


def test_the_form_refuses_values_out_of_range_naming_the_field():
    with pytest.raises(ValidationError, match="image_size"):
        IngestParams(url_list="urls.parquet", image_size=2)
    with pytest.raises(ValidationError, match="zero_stage"):
        TrainParams(dataset="d", zero_stage=5)
    with pytest.raises(ValidationError, match="recipe"):
        TrainParams(dataset="d", recipe="no-such-recipe")
    with pytest.raises(ValidationError, match="batch_size"):
        TrainParams(dataset="d", batch_size=0)
    with pytest.raises(ValidationError, match="zero_stag"):
        TrainParams.model_validate({"dataset": "d", "zero_stag": 2})  # a misspelt field is not ignored
    with pytest.raises(ValidationError, match="exactly one"):
        RetrainParams()
    with pytest.raises(ValidationError, match=r"overrides\.0\n.*credentials in a URI.*MLFLOW_TRACKING_PASSWORD"):
        TrainParams(dataset="d", overrides=['tracking.uri="http://admin:pw@10.0.0.5:5000"'])
    with pytest.raises(ValidationError, match=r"url_list\n.*credentials in a URI"):
        IngestParams(url_list="https://token@lists.example.com/urls.parquet")
    assert TrainParams(dataset="d", overrides=['tracking.uri="http://10.0.0.5:5000"']).to_config("d")


def test_train_params_become_the_recipe_with_the_fields_changed():
    cfg = TrainParams(dataset="/data/v1", recipe="debug", batch_size=64, max_steps=3, zero_stage=3,
                      overrides=["optim.lr=0.01"]).to_config("/data/v1")
    assert (cfg.recipe, cfg.model.name, cfg.data.dataset) == ("debug", "clip-debug", "/data/v1")
    assert (cfg.data.batch_size, cfg.optim.max_steps, cfg.parallel.zero_stage, cfg.optim.lr) == (64, 3, 3, 0.01)
    assert cfg.optim.warmup_steps <= cfg.optim.max_steps
    with pytest.raises(ValueError, match="data.batch_size"):  # the library's own validation still runs
        TrainParams(dataset="d", recipe="debug", batch_size=33).to_config("d")


def test_ingest_default_out_is_stable_for_the_same_list_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPIPE_HOME", str(tmp_path / "home"))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://example.com/a.jpg"], "caption": ["a red circle"]}), urls)
    first = IngestParams(url_list=str(urls)).to_config()
    assert first.out == IngestParams(url_list=str(urls)).to_config().out
    assert first.out.startswith(str(tmp_path / "home" / "datasets" / "urls-"))
    assert IngestParams(url_list=str(urls), image_size=32).to_config().out != first.out
    pq.write_table(pa.table({"url": ["http://example.com/b.jpg"], "caption": ["a blue square"]}), urls)
    assert IngestParams(url_list=str(urls)).to_config().out != first.out
    assert IngestParams(url_list=str(urls), out=str(tmp_path / "v1")).to_config().out == str(tmp_path / "v1")


def test_the_ingest_form_takes_a_conversation_file_and_its_images_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPIPE_HOME", str(tmp_path / "home"))
    chats = tmp_path / "chats.json"
    chats.write_text('[{"id": 1, "image": "a.jpg", "conversations": []}]')
    cfg = IngestParams(url_list=str(chats), kind="instructions", images=str(tmp_path)).to_config()
    assert (cfg.source.kind, cfg.source.images) == ("instructions", str(tmp_path))
    with pytest.raises(ValueError, match="source.images: is for image paths in a conversation file"):
        IngestParams(url_list=str(chats), images=str(tmp_path)).to_config()


def test_the_retrain_flow_mixes_the_captions_into_the_unified_stages_conversations():
    from pipelines.params import UnifiedSettings, mixed

    settings = UnifiedSettings(recipe="debug-unified", overrides=["optim.lr=0.002"])
    run = mixed(settings, "captions", "chats", 0.3, "data.draw_fraction=1.0")
    cfg = run.to_config(run.dataset)
    assert (cfg.data.dataset, cfg.data.mix, cfg.data.draw_fraction, cfg.optim.lr) == ("chats", {"captions": 0.7},
                                                                                      1.0, 0.002)
    alone = mixed(settings, "captions", None, 0.3, "data.draw_fraction=1.0")
    assert alone.dataset == "captions" and alone.to_config("captions").data.mix == {}, "no conversations: as it is"
    assert alone.to_config("captions").data.draw_fraction == 0.5
    with pytest.raises(ValidationError, match="instructions_weight"):
        RetrainParams(dataset="d", instructions_weight=1.0)
