"""Derived versions (data/derived.py): an image tokenizer's codes of an ingested dataset, computed once and
reused, resumed after a kill, made anew for another model version, a corrupted shard named and recomputed;
the training stream reads them as the data workers would have made them."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from mmcore.bundle import ModelBundle
from mmcore.cli import cmd_dataset_show, cmd_dataset_verify
from mmcore.data.derived import Derivation, derive
from mmcore.data.units import read_row_groups, work_units
from mmcore.models import build_model_for, model_config

pytestmark = pytest.mark.integration


def tokenizer_bundle(directory, dataset, seed: int):
    """A fresh vq-debug image tokenizer saved as a registered model's bundle is."""
    torch.manual_seed(seed)
    tokenizer_json = dataset.tokenizer_path.read_text()
    model, preprocess = build_model_for(model_config("vq-debug"), Tokenizer.from_str(tokenizer_json))
    return ModelBundle.write(directory, model, model_config("vq-debug"), tokenizer_json, preprocess).directory


@pytest.fixture(scope="module")
def bundles(train_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("image-tokenizers")
    return {seed: tokenizer_bundle(root / f"v{seed}", train_dataset, seed) for seed in (1, 2)}


def derived_codes(derived) -> np.ndarray:
    return np.concatenate([np.stack(pq.read_table(str(derived.path / "shards" / s["name"])).column("codes").to_numpy(
        zero_copy_only=False)) for s in derived.manifest["shards"]])


def said(capsys) -> str:
    return capsys.readouterr().out


def test_codes_are_computed_once_and_equal_what_the_data_workers_make(train_dataset, bundles, capsys):
    derivation = Derivation("image-codes", "models:/mmpipe-image-tokenizer/1", bundles[1])
    derived = derive(train_dataset, derivation)
    assert "computing image-codes" in said(capsys)
    manifest = json.loads((derived.path / "manifest.json").read_text())
    assert manifest["dataset_id"] == train_dataset.id and manifest["model"] == "models:/mmpipe-image-tokenizer/1"
    assert manifest["columns"] == ["codes"]
    assert sum(s["rows"] for s in manifest["shards"]) == train_dataset.manifest["rows"]["kept"]

    # The same pair again: read, not computed.
    before = {p.name: p.stat().st_mtime_ns for p in (derived.path / "shards").iterdir()}
    again = derive(train_dataset, derivation)
    assert "computing" not in said(capsys) and again.manifest == derived.manifest
    assert {p.name: p.stat().st_mtime_ns for p in (derived.path / "shards").iterdir()} == before

    # The unified stage's plan reads the codes from it: the batches the data workers make from the images.
    from mmcore.cli import apply_overrides
    from mmcore.data.units import local_batches
    from mmcore.recipes import recipe
    from mmcore.stages import STAGES
    from mmcore.train.plan import plan

    cfg = apply_overrides(recipe("debug-unified", str(train_dataset.path)),
                          ["model.parent=models:/mmpipe-image-tokenizer/1"])
    arch = {**model_config("unified-debug"), **STAGES["unified"].parent.takes(model_config("vq-debug"))}
    steps = plan(cfg, train_dataset, arch, 1, {"parent": bundles[1]})
    assert "image" not in steps.train_preprocess.columns and steps.train_units[0]["derived"].startswith(
        str(derived.path))
    inline = plan(apply_overrides(cfg, ["data.augment=true"]), train_dataset, arch, 1, {"parent": bundles[1]})
    assert "derived" not in inline.train_units[0], "augmented images are coded by the data workers"
    units = [{k: v for k, v in unit.items() if k != "derived"} for unit in steps.train_units[:3]]
    read, made = (next(local_batches(u, pre, 16))[0] for u, pre in ((steps.train_units[:3], steps.train_preprocess),
                                                                   (units, inline.train_preprocess.for_split("train",
                                                                                                             False))))
    assert read.keys() == made.keys() and all(torch.equal(read[k], made[k]) for k in read)


def test_a_killed_derivation_goes_on_and_another_model_version_is_another_derived_version(
        train_dataset, bundles, capsys):
    derivation = Derivation("image-codes", "models:/mmpipe-image-tokenizer/2", bundles[2])
    whole = derive(train_dataset, derivation)
    codes = derived_codes(whole)
    # Killed before its manifest, one shard not written: the next call writes that one only.
    (whole.path / "manifest.json").unlink()
    missing = whole.manifest["shards"][-1]["name"]
    (whole.path / "shards" / missing).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (whole.path / "shards").iterdir()}
    said(capsys)
    resumed = derive(train_dataset, derivation)
    assert f"1 of {len(whole.manifest['shards'])} shards" in said(capsys)
    assert {name: (whole.path / "shards" / name).stat().st_mtime_ns for name in kept} == kept
    assert resumed.manifest == whole.manifest and np.array_equal(derived_codes(resumed), codes)

    # Another version of the parent: a derived version of its own, with other codes.
    other = derive(train_dataset, Derivation("image-codes", "models:/mmpipe-image-tokenizer/1", bundles[1]))
    assert other.path != whole.path and not np.array_equal(derived_codes(other), codes)
    # The same version name with other weights (another registry's): replaced, and said so.
    said(capsys)
    replaced = derive(train_dataset, Derivation("image-codes", "models:/mmpipe-image-tokenizer/2", bundles[1]))
    assert "computed from other data or weights" in said(capsys)
    assert np.array_equal(derived_codes(replaced), derived_codes(other))


def test_a_corrupted_derived_shard_is_named_and_computed_again(train_dataset, bundles, capsys):
    derivation = Derivation("image-codes", "models:/mmpipe-image-tokenizer/1", bundles[1])
    derived = derive(train_dataset, derivation)
    codes = derived_codes(derived)
    shard = derived.path / "shards" / derived.manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    said(capsys)
    assert cmd_dataset_verify(argparse.Namespace(dir=str(train_dataset.path))) == 1  # `mmpipe dataset verify`
    assert f"{shard}: sha256 or size differs from the manifest (computed again when next read)" in said(capsys)
    again = derive(train_dataset, derivation)
    out = said(capsys)
    assert f"{shard}: sha256 or size differs from the manifest; computing it again" in out
    assert f"1 of {len(derived.manifest['shards'])} shards" in out
    assert np.array_equal(derived_codes(again), codes) and again.manifest == derived.manifest
    assert cmd_dataset_verify(argparse.Namespace(dir=str(train_dataset.path))) == 0
    cmd_dataset_show(argparse.Namespace(dir=str(train_dataset.path)))
    assert "image-codes by models:/mmpipe-image-tokenizer/1 (codes;" in said(capsys)


def test_a_derived_shard_of_other_rows_is_refused_by_name(train_dataset, bundles):
    derived = derive(train_dataset, Derivation("image-codes", "models:/mmpipe-image-tokenizer/1", bundles[1]))
    other = derived.shard(work_units(train_dataset, "val")[0]["path"])  # one row group
    first, later = (next(u for u in work_units(train_dataset, "train") if (u["row_group"] == 0) == wanted)
                    for wanted in (True, False))
    with pytest.raises(ValueError, match=f"{other}: row group 0 does not hold the rows of"):
        read_row_groups({k: [v] for k, v in {**first, "derived": other}.items()}, ["codes"])
    with pytest.raises(ValueError, match=f"{other}: row group {later['row_group']} cannot be read"):
        read_row_groups({k: [v] for k, v in {**later, "derived": other}.items()}, ["codes"])


def test_conversations_about_one_image_get_its_codes_once_computed(train_chats, bundles):
    """An instruction dataset holds several rows per image: each gets the codes of its own image."""
    from mmcore.data.mixed import MixedPreprocessor
    from mmcore.models import architecture

    derived = derive(train_chats, Derivation("image-codes", "models:/mmpipe-image-tokenizer/1", bundles[1]))
    unit = work_units(train_chats, "train")[0]
    rows = read_row_groups({k: [v] for k, v in {**unit, "derived": derived.shard(unit["path"])}.items()},
                           ["image", "sha256", "codes"])
    assert len(set(rows.column("sha256").to_pylist())) < rows.num_rows, "the fixture asks about images twice"
    bundle = ModelBundle.at(bundles[1])
    model, pre = bundle.load()
    made = MixedPreprocessor(pre.cfg, bundle.tokenizer_json(), {
        "config": architecture(model_config("vq-debug")), "state": {k: v.numpy() for k, v in model.state_dict().items()}
    }).codes(pre.batch_pixels(rows.column("image").to_pylist()))
    assert np.array_equal(np.stack(rows.column("codes").to_numpy(zero_copy_only=False)), made)


def test_a_frozen_tower_is_read_as_features_that_give_the_loss_of_pixels(train_chats, tmp_path):
    """The fusion stage on a frozen tower reads its tokens from a derived version: the loss of the same batch
    as from pixels (features stored in float16); a tower that trains, a start_from whose tower trained, or
    data.derived=false reads pixels."""
    from mmcore.cli import apply_overrides
    from mmcore.data.units import local_batches
    from mmcore.recipes import recipe
    from mmcore.stages import STAGES
    from mmcore.tasks import build_task
    from mmcore.train.plan import plan

    torch.manual_seed(0)
    tokenizer_json = train_chats.tokenizer_path.read_text()
    clip, preprocess = build_model_for(model_config("clip-debug"), Tokenizer.from_str(tokenizer_json))
    parent = ModelBundle.write(tmp_path / "clip", clip, model_config("clip-debug"), tokenizer_json,
                               preprocess).directory
    cfg = apply_overrides(recipe("debug-fusion", str(train_chats.path)), ["model.parent=models:/mmpipe-contrastive/3"])
    arch = {**model_config("llava-debug"), **STAGES["fusion"].parent.takes(model_config("clip-debug"))}
    steps = plan(cfg, train_chats, arch, 1, {"parent": parent})
    layers = arch["vision"]["layers"]  # llava-debug reads the hidden state before the last (vision_layer -2)
    derived = steps.train_units[0]["derived"]
    assert f"derived/image-features-layer{layers - 1}-mmpipe-contrastive-3/shards/" in derived
    assert "image" not in steps.train_preprocess.columns

    trained_tower = plan(apply_overrides(cfg, ["model.freeze_vision=false"]), train_chats, arch, 1, {"parent": parent})
    assert "derived" not in trained_tower.train_units[0] and "image" in trained_tower.train_preprocess.columns
    switched_off = plan(apply_overrides(cfg, ["data.derived=false"]), train_chats, arch, 1, {"parent": parent})
    assert "derived" not in switched_off.train_units[0] and "image" in switched_off.train_preprocess.columns
    units = [{k: v for k, v in unit.items() if k != "derived"} for unit in steps.train_units[:2]]
    read, made = (next(local_batches(u, pre, 16))[0] for u, pre in ((steps.train_units[:2], steps.train_preprocess),
                                                                   (units, trained_tower.train_preprocess)))
    assert read["image_features"].dtype == torch.float16 and "image" not in read
    task, _ = build_task(cfg, arch, steps.tokenizer_json, {"parent": parent})
    task.eval()
    with torch.no_grad():
        from_features, from_pixels = task(read)["loss"], task(made)["loss"]
    assert abs(float(from_features) - float(from_pixels)) < 1e-3 * float(from_pixels)

    # LLaVA's second phase starts from the first's model: its tower the parent's, the same derived version.
    start = ModelBundle.write(tmp_path / "aligned", task.model, arch, steps.tokenizer_json, steps.preprocess).directory
    phase_two = plan(cfg, train_chats, arch, 1, {"parent": parent, "start_from": start})
    assert phase_two.train_units[0]["derived"] == derived
    with torch.no_grad():
        task.model.visual.ln_pre.weight.add_(0.1)  # a first phase that trained the tower
    moved = ModelBundle.write(tmp_path / "moved", task.model, arch, steps.tokenizer_json, steps.preprocess).directory
    assert "derived" not in plan(cfg, train_chats, arch, 1, {"parent": parent, "start_from": moved}).train_units[0]
