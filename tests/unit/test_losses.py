"""Losses against brute-force per-pair formulas from the papers, and under simulated data parallelism."""

from __future__ import annotations

import math

import pytest
import torch

from mmcore.losses import ClipLoss, SigLipLoss


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return img, txt


def clip_reference(img, txt, scale):
    """Radford et al. 2021: mean of image->text and text->image cross-entropy, written per pair."""
    img, txt = img.detach(), txt.detach()
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        logits_i = [scale * float(img[i] @ txt[j]) for j in range(n)]
        logits_t = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -logits_i[i] + math.log(sum(math.exp(x) for x in logits_i))
        total += -logits_t[i] + math.log(sum(math.exp(x) for x in logits_t))
    return total / (2 * n)


def siglip_reference(img, txt, scale, bias):
    """Zhai et al. 2023, eq. 1: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))."""
    img, txt = img.detach(), txt.detach()
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    return total / n


def test_clip_loss_matches_the_per_pair_formula():
    img, txt = _features()
    loss = ClipLoss(init_temperature=0.07)
    out = loss(img, txt)
    assert out["loss"].item() == pytest.approx(clip_reference(img, txt, 1 / 0.07), rel=1e-5)


def test_siglip_loss_matches_the_per_pair_formula():
    img, txt = _features()
    loss = SigLipLoss(init_temperature=0.1, init_bias=-10.0)
    assert loss(img, txt)["loss"].item() == pytest.approx(siglip_reference(img, txt, 10.0, -10.0), rel=1e-5)


def test_clip_temperature_is_clamped():
    img, txt = _features()
    loss = ClipLoss(init_temperature=1e-4, max_scale=100.0)
    assert loss(img, txt)["logit_scale"].item() == pytest.approx(100.0)


def test_parameters_are_not_zero_dimensional():
    """DeepSpeed fails on 0-dim parameters with several ranks (STACK_NOTES)."""
    for loss in (ClipLoss(), SigLipLoss()):
        assert all(p.ndim >= 1 for p in loss.parameters())


@pytest.mark.parametrize("loss_class", [ClipLoss, SigLipLoss])
def test_sharded_loss_equals_full_batch_loss_and_gradients(loss_class):
    """Two simulated ranks, each scoring its half against the gathered features (a fake collective):
    the mean of their losses is the full-batch loss, and the gradients agree."""
    img, txt = _features(n=8)
    full = loss_class()(img, txt)["loss"]
    full_grads = torch.autograd.grad(full, [img, txt])

    img2, txt2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    halves = [(img2[:4], txt2[:4]), (img2[4:], txt2[4:])]
    gathered = {"img": torch.cat([h[0] for h in halves]), "txt": torch.cat([h[1] for h in halves])}
    losses = []
    for rank, (i, t) in enumerate(halves):
        def fake_gather(x, _i=i):
            return gathered["img"] if x is _i else gathered["txt"]
        losses.append(loss_class(gather=fake_gather, rank=lambda r=rank: r)(i, t)["loss"])
    sharded = torch.stack(losses).mean()
    assert sharded.item() == pytest.approx(full.item(), rel=1e-5)
    sharded_grads = torch.autograd.grad(sharded, [img2, txt2])
    for a, b in zip(full_grads, sharded_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_losses_fall_when_pairs_align():
    img, txt = _features()
    aligned = ClipLoss()(img, img.detach())["loss"].item()
    random = ClipLoss()(img, txt)["loss"].item()
    assert aligned < random
