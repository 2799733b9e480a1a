"""Architectures as data: every named config builds; shapes, registers, pooling, preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmcore.data.config import TokenizerConfig
from mmcore.data.tokenizer import train_tokenizer
from mmcore.models import build_model, list_models, model_config
from mmcore.models.preprocess import PreprocessConfig, Preprocessor
from mmcore.models.towers import VisionConfig, VisionTower


def test_every_family_has_a_debug_flavour_and_names_resolve():
    names = list_models()
    families = {model_config(n)["family"] for n in names}
    assert all(f"{family}-debug" in names for family in families)
    with pytest.raises(ValueError, match="model.name: unknown architecture 'clip-huge'"):
        model_config("clip-huge")


def test_debug_model_shapes_and_unit_norm():
    model, pre = build_model(model_config("clip-debug"), vocab_size=300, eos_id=3)
    images = torch.randn(5, 3, pre.image_size, pre.image_size)
    tokens = torch.randint(5, 300, (5, pre.context_length))
    tokens[:, 7] = 3
    out = model(images, tokens)
    for key in ("image_features", "text_features"):
        assert out[key].shape == (5, 32)
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(5), atol=1e-5)


def test_text_pools_at_eos_so_padding_does_not_matter():
    model, pre = build_model(model_config("clip-debug"), vocab_size=300, eos_id=3)
    model.eval()
    a = torch.tensor([[2, 10, 11, 3] + [0] * (pre.context_length - 4)])
    b = a.clone()
    b[0, 6:] = 17  # different tokens after <eos> (causal attention cannot see them)
    assert torch.allclose(model.encode_text(a), model.encode_text(b), atol=1e-6)


def test_register_tokens_are_dropped_from_the_output():
    tower = VisionTower(VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, registers=4))
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 32)


def test_vision_config_validation():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_model({**model_config("clip-debug"), "vision": {"image_size": 30, "patch_size": 8, "width": 32,
                                                             "layers": 1, "heads": 2}}, 300, 3)


def test_preprocessor_matches_the_model_and_pickles():
    import pickle

    tokenizer = train_tokenizer(["a red circle", "two blue squares"] * 20, TokenizerConfig(vocab_size=300))
    pre = Preprocessor(PreprocessConfig(image_size=32, context_length=8), tokenizer.to_str())
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(buffer, "JPEG")
    batch = pickle.loads(pickle.dumps(pre))({"image": [buffer.getvalue()] * 2,
                                              "caption": ["a red circle", "two blue squares and more words"]})
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == np.uint8  # normalized by the Task
    assert batch["image"][0, 0].mean() == pytest.approx(254, abs=3) and batch["image"][0, 2].mean() < 3  # red
    assert pre.images([buffer.getvalue()])[0, 0].mean() == pytest.approx(1.0, abs=0.02)  # red, in [-1, 1]
    assert batch["tokens"].shape == (2, 8) and batch["tokens"][0, 0] == 2  # <bos>
    assert 3 in batch["tokens"][1]  # <eos> survives truncation


def test_uint8_stream_normalized_by_the_task_equals_the_float_path():
    """Training streams uint8 pixels and the Task normalizes them on its device; evaluation decodes to
    normalized floats. Both must feed the model the same tensor as the float32 formula did."""
    from mmcore.config import RunConfig
    from mmcore.tasks import build_task

    tokenizer = train_tokenizer(["a red circle", "two blue squares"] * 20, TokenizerConfig(vocab_size=300))
    task, pre_cfg = build_task(RunConfig(), model_config("clip-debug"), tokenizer.to_str())
    pre = Preprocessor(pre_cfg, tokenizer.to_str())
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    pixels = pre({"image": blobs, "caption": ["a red circle"] * 3})["image"]
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) for v in (pre_cfg.mean, pre_cfg.std))
    formula = (pixels.astype(np.float32) / 255.0 - mean) / std  # what the stream carried before, as float32
    seen = {}
    task.model.forward = lambda images, tokens: seen.update(images=images) or {
        "image_features": torch.ones(3, 2), "text_features": torch.ones(3, 2)}
    task({"image": torch.from_numpy(pixels), "tokens": torch.zeros(3, pre_cfg.context_length, dtype=torch.long)})
    assert seen["images"].dtype == torch.float32
    assert np.allclose(seen["images"].numpy(), formula, atol=1e-6)
    assert np.allclose(pre.images(blobs), formula, atol=1e-6)


def test_the_sampler_keeps_to_its_settings_and_draws_as_the_plain_formula_does():
    import torch

    from mmcore.models.sampling import sample

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0001]] * 2000))
    assert sample(logits).tolist() == [0] * 2000, "greedy at temperature 0"
    draw = lambda **kw: set(sample(logits, 1.0, generator=torch.Generator().manual_seed(0), **kw).tolist())  # noqa: E731
    assert draw(top_k=1) == {0} and draw(top_k=2) == {0, 1} and draw(top_p=0.5) == {0} and draw(top_p=0.8) == {0, 1}
    counts = torch.bincount(sample(logits, 1.0, generator=torch.Generator().manual_seed(1)), minlength=4) / 2000
    assert abs(counts[0] - 0.6) < 0.05 and abs(counts[1] - 0.3) < 0.05
    # Without top-k or top-p it is the plain draw from softmax(logits / temperature): the same tokens for a seed
    # (the unified model's drawings depend on it).
    plain = torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample(logits, 0.7, generator=torch.Generator().manual_seed(2)), plain.squeeze(-1))
