"""Distillation losses on random tensors: zero at a match, the textbook formulas, masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill.losses import attention_loss, cross_entropy, hidden_loss, logit_divergence


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_forward_kl_is_hintons_kd_with_t_squared():
    s, t = _logits(0), _logits(1)
    T = 2.0
    want = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="none").sum(-1).mean() * T * T
    got = logit_divergence(s, t, temperature=T)
    assert torch.allclose(got, want, atol=1e-6)
    assert logit_divergence(s, s.clone(), temperature=T).abs() < 1e-6
    assert got > 0.1


def test_reverse_kl_swaps_the_arguments_and_js_is_symmetric_and_bounded():
    s, t = _logits(2), _logits(3)
    assert torch.allclose(logit_divergence(s, t, kind="reverse"), logit_divergence(t, s, kind="forward"), atol=1e-6)
    js = logit_divergence(s, t, kind="js")
    assert torch.allclose(js, logit_divergence(t, s, kind="js"), atol=1e-6)
    assert 0 < js < math.log(2)
    # far-apart one-hot-like distributions approach the bound
    a, b = torch.full((1, 1, 4), -50.0), torch.full((1, 1, 4), -50.0)
    a[..., 0], b[..., 1] = 50.0, 50.0
    assert logit_divergence(a, b, kind="js") == pytest.approx(math.log(2), rel=1e-4)


def test_gradient_reaches_the_student_only_and_masked_positions_do_not_count():
    s, t = _logits(4).requires_grad_(), _logits(5).requires_grad_()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :2] = True
    logit_divergence(s, t, mask=mask).backward()
    assert t.grad is None
    assert s.grad[:, :2].abs().sum() > 0 and s.grad[:, 2:].abs().sum() == 0
    only = logit_divergence(s[:, :2], t[:, :2])
    assert torch.allclose(logit_divergence(s, t, mask=mask), only, atol=1e-6)


def test_logit_shapes_must_match():
    with pytest.raises(ValueError, match="same vocabulary"):
        logit_divergence(_logits(0), _logits(1, (2, 5, 12)))
    with pytest.raises(ValueError, match="kind must be one of"):
        logit_divergence(_logits(0), _logits(1), kind="tvd")


def test_hidden_losses():
    t = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))
    s = t + 0.1 * torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    assert hidden_loss(t.clone(), t) == 0
    mse = hidden_loss(s, t)
    assert torch.allclose(mse, (s - t).pow(2).mean() / t.pow(2).mean(), atol=1e-6)
    assert torch.allclose(hidden_loss(10 * s, 10 * t), mse, rtol=1e-5)  # normalised: scale-free
    cos = hidden_loss(s, t, kind="cosine")
    assert 0 < cos < 0.05
    assert torch.allclose(hidden_loss(5 * s, t, kind="cosine"), cos, atol=1e-6)
    with pytest.raises(ValueError, match="project"):
        hidden_loss(s[..., :8], t)


def test_attention_loss_averages_heads():
    t = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    assert attention_loss(t.clone(), t).abs() < 1e-6
    fewer = t.mean(1, keepdim=True)  # a one-head student with the teacher's mean map matches it exactly
    assert attention_loss(fewer, t).abs() < 1e-6
    other = torch.softmax(torch.randn(2, 2, 6, 6), -1)
    assert attention_loss(other, t) > 0.01


def test_cross_entropy_is_next_token():
    ids = torch.randint(0, 11, (2, 5))
    logits = _logits(6)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(cross_entropy(logits, ids), want, atol=1e-6)
