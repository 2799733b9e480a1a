"""The image tokenizer's model: codes, decoding, its config's errors, its pyfunc batching."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmcore.eval.reconstruction import psnr_per_image
from mmcore.models import build_model, capabilities, model_config
from mmcore.models.imagetok import psnr
from mmcore.models.preprocess import Preprocessor
from mmcore.tasks import ImageTokenizerTask
from mmcore.pyfunc import tokenize_rows


@pytest.fixture(scope="module")
def tokenizer_model():
    torch.manual_seed(0)
    return build_model(model_config("vq-debug"), 0, 0)


def test_codes_lie_in_the_codebook_and_decode_as_the_training_path_reconstructs(tokenizer_model):
    model, pre = tokenizer_model
    images = torch.rand(5, 3, pre.image_size, pre.image_size) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (5, model.grid ** 2) == (5, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size == 125
    decoded = model.decode(codes)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    reconstruction, training_codes = model(images)
    assert torch.equal(training_codes, codes)
    assert torch.allclose(decoded, reconstruction.clamp(-1, 1), atol=1e-5)
    assert capabilities(model) == {"tokenize_image"}


def test_decode_refuses_codes_outside_the_codebook(tokenizer_model):
    model, _ = tokenizer_model
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 125\); got 0\.\.125"):
        model.decode(torch.tensor([[0] * 15 + [125]]))


@pytest.mark.parametrize("change, message", [({"image_size": 36}, "not divisible by 2\\^3"),
                                             ({"levels": [2, 5]}, "each must be >= 3"),
                                             ({"channels": [12, 16]}, "multiple of 8")])
def test_a_bad_tokenizer_config_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        build_model({**model_config("vq-debug"), **change}, 0, 0)


def test_psnr_of_the_training_log_and_of_the_suite_agree():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    rebuilt = np.clip(original.astype(int) + rng.integers(-6, 7, original.shape), 0, 255).astype(np.uint8)
    error = ((original.astype(np.float64) - rebuilt) / 255) ** 2
    assert float(psnr(torch.from_numpy(error))) == pytest.approx(psnr_per_image(original, rebuilt).mean(), abs=1e-4)
    assert psnr_per_image(original, original).tolist() == [100.0] * 3


def test_the_task_reports_loss_psnr_and_codebook_use(tokenizer_model):
    model, pre = tokenizer_model
    out = ImageTokenizerTask(model, pre)({"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)})
    assert set(out) == {"loss", "psnr", "codebook_usage"} and out["loss"].requires_grad
    assert 0 < float(out["codebook_usage"]) <= 4 * 16 / 125 and not out["psnr"].requires_grad


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_pyfunc_codes_in_batches_equal_row_by_row_and_a_bad_row_is_named(tokenizer_model):
    model, pre = tokenizer_model
    preprocess = Preprocessor(pre, "")
    frame = pd.DataFrame({"image": [_png(i) for i in range(5)]})
    batched = tokenize_rows(model, preprocess, frame, batch_size=2)
    one_by_one = np.concatenate([tokenize_rows(model, preprocess, frame.iloc[[i]]) for i in range(5)])
    assert batched.shape == (5, 16) and np.array_equal(batched, one_by_one)
    with pytest.raises(ValueError, match="row 3: the image cannot be decoded"):
        tokenize_rows(model, preprocess, pd.DataFrame({"image": [_png(0), _png(1), _png(2), b"not an image"]}),
                      batch_size=2)
    with pytest.raises(ValueError, match="row 1: each row needs an `image`"):
        tokenize_rows(model, preprocess, pd.DataFrame({"image": [_png(0), None]}))
