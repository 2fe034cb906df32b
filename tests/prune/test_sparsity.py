"""Mask math and the SparseGPT solver on random matrices (no model)."""

import pytest
import torch

from compress.prune.sparsegpt import prune_weight
from compress.prune.sparsity import SparsityConfig, check_n_m, parse_pattern, prune_mask
from compress.prune.wanda import wanda_scores


def _problem(n=256, out=48, T=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    X = (torch.randn(T, n, generator=g) @ A) * (1 + 4 * (torch.rand(n, generator=g) > 0.9))  # outlier channels
    W = torch.randn(out, n, generator=g)
    return W, X, 2 * X.T @ X / T


def _out_err(X, W, Wp):
    return (X @ (W - Wp).T).pow(2).mean().item()


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.77, 0.0])
def test_row_and_layer_masks_have_exact_counts(fraction):
    scores = torch.randn(37, 90).abs()
    scores[:, :10] = 1.0  # ties must not change the count
    row = prune_mask(scores, fraction, scope="row")
    assert (row.sum(1) == round(fraction * 90)).all()
    layer = prune_mask(scores, fraction, scope="layer")
    assert layer.sum() == round(fraction * 37 * 90)
    if fraction:  # the lowest scores go: every pruned score <= every kept one
        assert scores[layer].max() <= scores[~layer].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_n_m_mask_keeps_n_of_every_m(pattern):
    n, m = parse_pattern(pattern)
    scores = torch.rand(16, 64)
    mask = prune_mask(scores, 0.0, (n, m))
    assert (mask.reshape(16, -1, m).sum(-1) == m - n).all()
    W = torch.randn(16, 64).masked_fill(mask, 0)
    assert check_n_m(W, (n, m)) and not check_n_m(torch.randn(16, 64), (n, m))


def test_pattern_and_config_errors():
    for bad in ("4:2", "2:2", "0:4", "2-4", "x"):
        with pytest.raises(ValueError, match="N:M"):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="contradicts"):
        SparsityConfig(sparsity=0.3, pattern="2:4")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparsityConfig(sparsity=1.0)
    assert SparsityConfig().fraction == 0.5 and SparsityConfig(pattern="1:4").fraction == 0.75
    assert SparsityConfig(sparsity=0.5, pattern="2:4").label == "2:4"
    with pytest.raises(ValueError, match="multiple of M"):
        prune_mask(torch.rand(4, 10), 0.0, (2, 4))


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_sparsegpt_beats_wanda_and_magnitude_on_layer_output(pattern):
    W, X, H = _problem()
    n_m = parse_pattern(pattern) if pattern else None
    Wp, loss = prune_weight(W, H, 0.5, n_m)
    assert (Wp == 0).sum() == W.numel() // 2
    if n_m:
        assert check_n_m(Wp, n_m)
    mag = W.masked_fill(prune_mask(W.abs(), 0.5, n_m, scope="layer" if n_m is None else "row"), 0)
    wan = W.masked_fill(prune_mask(wanda_scores(W, X.norm(dim=0)), 0.5, n_m), 0)
    e_sgpt, e_wanda, e_mag = (_out_err(X, W, w) for w in (Wp, wan, mag))
    assert e_sgpt < 0.8 * e_wanda and e_wanda < e_mag
    assert loss > 0


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.61])
def test_sparsegpt_count_is_exact_for_odd_fractions(fraction):
    W, _, H = _problem(n=200, out=13)
    Wp, _ = prune_weight(W, H, fraction, block_size=64)
    assert (Wp == 0).sum() == round(fraction * W.numel())


def test_sparsegpt_with_identity_hessian_is_magnitude_n_m():
    # H = I: no correlations, nothing to compensate; saliency is w^2, so 2:4 SparseGPT is 2:4 magnitude
    W, _, _ = _problem()
    Wp, _ = prune_weight(W, torch.eye(W.shape[1]), 0.5, (2, 4), dampening=0.0)
    assert torch.equal(Wp, W.masked_fill(prune_mask(W.abs(), 0.0, (2, 4)), 0))


def test_sparsegpt_leaves_dead_inputs_free():
    W, X, H = _problem()
    H[:, 5] = 0
    H[5, :] = 0  # input 5 never fires
    Wp, _ = prune_weight(W, H, 0.5)
    assert torch.isfinite(Wp).all() and (Wp == 0).sum() == W.numel() // 2
