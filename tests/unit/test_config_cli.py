"""Configs validate at the edge and name the field; the CLI's overrides reach nested fields."""

from __future__ import annotations

import pytest

from mmcore.cli import apply_overrides
from mmcore.config import from_dict, to_dict
from mmcore.data.config import DownloadConfig, FilterConfig, IngestConfig, SourceConfig, SplitConfig


def _cfg(**kw):
    return IngestConfig(source=SourceConfig(path="list.parquet"), out="out", **kw)


@pytest.mark.parametrize("cfg, field", [
    (_cfg(download=DownloadConfig(resize_mode="stretch")), "download.resize_mode"),
    (_cfg(download=DownloadConfig(processes=0)), "download.processes"),
    (_cfg(filters=FilterConfig(languages=["xx"])), "filters.languages"),
    (_cfg(split=SplitConfig(val_fraction=0.6, test_fraction=0.5)), "split"),
    (IngestConfig(source=SourceConfig(path="l", format="xml"), out="o"), "source.format"),
    (_cfg(rows_per_shard=0), "rows_per_shard"),
])
def test_invalid_configs_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        cfg.validate()


def test_round_trip_and_unknown_fields():
    cfg = _cfg()
    assert from_dict(IngestConfig, to_dict(cfg)) == cfg
    data = to_dict(cfg)
    data["download"]["colour"] = 1
    with pytest.raises(ValueError, match=r"DownloadConfig: unknown field\(s\) \['colour'\]"):
        from_dict(IngestConfig, data)


def test_overrides():
    cfg = apply_overrides(_cfg(), ["download.image_size=128", "filters.languages=[\"en\", \"fr\"]", "out=elsewhere"])
    assert cfg.download.image_size == 128 and cfg.filters.languages == ["en", "fr"] and cfg.out == "elsewhere"
    for bad in ["download.size=1", "nosuch.field=1", "download.image_size"]:
        with pytest.raises(ValueError, match="--set"):
            apply_overrides(_cfg(), [bad])


def test_a_mix_of_dataset_versions_is_a_mapping_of_path_to_weight():
    from mmcore.recipes import recipe

    cfg = apply_overrides(recipe("debug-unified", "captions"), ['data.mix={"chats": 0.5}'])
    assert cfg.data.mix == {"chats": 0.5}
    cfg.validate()
    for mix, match in [('{"chats": 1}', "^data.mix: each weight must be in"),
                       ('{"a": 0.6, "b": 0.5}', "together under 1"),
                       ('{"captions": 0.5}', "^data.mix: names data.dataset itself")]:
        with pytest.raises(ValueError, match=match):
            apply_overrides(recipe("debug-unified", "captions"), [f"data.mix={mix}"]).validate()
    with pytest.raises(ValueError, match=r"data.mix\['chats'\]: expected float, got str"):
        apply_overrides(recipe("debug-unified", "captions"), ['data.mix={"chats": "half"}'])
