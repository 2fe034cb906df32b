"""Range observers on synthetic data with known answers: outliers clipped by percentile/MSE/KL, not by min/max."""

import pytest
import torch

from calibrate.observers import (
    HistogramObserver,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    fake_quantize,
    make_observer,
    qparams,
)


def gaussian_with_outliers(n=400_000, outliers=4, at=50.0, seed=0):
    """N(0, 1) with a few values at +-50: rare enough (1e-5) that clipping them lowers the squared error."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randperm(n, generator=g)[:outliers]] = at * torch.sign(torch.randn(outliers, generator=g))
    return x


def feed(obs, x, batches=8):
    for part in x.reshape(batches, -1, *x.shape[1:]) if x.dim() > 1 else x.reshape(batches, -1):
        obs.add_batch(part)
    return obs


def quant_mse(x, lo, hi, symmetric=True):
    scale, zero = qparams(lo, hi, symmetric=symmetric)
    return float((fake_quantize(x, scale, zero) - x).pow(2).mean())


def test_minmax_keeps_the_outliers_and_averages_when_asked():
    x = gaussian_with_outliers()
    lo, hi = feed(MinMaxObserver(), x).range()
    assert float(hi) == 50.0 and float(lo) == -50.0
    avg = MinMaxObserver(averaging=0.5)
    avg.add_batch(torch.tensor([0.0, 4.0]))
    avg.add_batch(torch.tensor([-2.0, 2.0]))
    assert avg.range() == (torch.tensor(-1.0), torch.tensor(3.0))  # lo 0 + 0.5 (-2 - 0), hi 4 + 0.5 (2 - 4)


def test_percentile_is_the_gaussian_quantile():
    x = gaussian_with_outliers()
    t = float(feed(PercentileObserver(percentile=99.99), x).range()[1])
    assert t == pytest.approx(3.91, rel=0.03)  # |N(0, 1)| beyond t holds 1e-4 - 1e-5 (the outliers): z_(1 - 4.5e-5)
    lo, hi = feed(PercentileObserver(percentile=99.9, symmetric=False), x + 1.0).range()
    assert float(lo) == pytest.approx(1 - 3.0902, rel=0.03) and float(hi) == pytest.approx(1 + 3.0902, rel=0.03)


@pytest.mark.parametrize("outliers", [0, 4])
def test_mse_finds_the_brute_force_optimum(outliers):
    """The chosen threshold's real quantization error is within 2 % of the best of a fine grid of thresholds."""
    x = gaussian_with_outliers(outliers=outliers)
    lo, hi = feed(MSEObserver(), x).range()
    assert float(lo) == -float(hi)
    grid = torch.linspace(1.0, 50.0, 197)
    errors = torch.tensor([quant_mse(x, -t, t) for t in grid])
    assert quant_mse(x, lo, hi) <= 1.02 * float(errors.min())
    if outliers:  # rare outliers at 50: clipping them (to about 33 here) beats keeping them
        assert float(hi) < 45 and quant_mse(x, lo, hi) < 0.8 * quant_mse(x, torch.tensor(-50.0), torch.tensor(50.0))
    else:  # a plain Gaussian: MSE clips well inside its extremes (about 4.4 sigma at 400k samples)
        assert float(hi) < 0.97 * float(x.abs().max())
    a_lo, a_hi = feed(MSEObserver(symmetric=False), x.abs()).range()  # one-sided data: lo stays at 0
    assert float(a_lo) == 0.0 and float(a_hi) < float(x.abs().max())


def test_kl_clips_outliers():
    x = gaussian_with_outliers()
    t = float(feed(KLObserver(), x).range()[1])
    assert 2.5 < t < 10.0
    with pytest.raises(ValueError, match="per tensor and symmetric"):
        KLObserver(per_channel=True)


def test_per_channel_ranges_follow_each_channel():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 10.0])
    x = torch.randn(100_000, 3, generator=g) * scales  # (tokens, channels)
    for obs in (MinMaxObserver(per_channel=True), PercentileObserver(per_channel=True, percentile=99.9),
                MSEObserver(per_channel=True)):
        lo, hi = feed(obs, x).range()
        assert hi.shape == (3,)
        ratio = hi / scales
        assert float(ratio.max() / ratio.min()) < 1.15, type(obs).__name__  # same shape, scaled


def test_histogram_growth_keeps_counts_exact():
    obs = HistogramObserver(bins=256)
    obs.add_batch(torch.tensor([0.1, -0.1, 0.05]))
    obs.add_batch(torch.tensor([3.0, -7.0]))  # R doubles until it covers 7
    assert float(obs.hist.sum()) == 5 and float(obs.radius[0]) >= 7.0
    c = obs._centers()[0]
    occupied = c[obs.hist[0] > 0]
    assert float(occupied.min()) < -6.5 and float(occupied.max()) > 2.5


def test_qparams_cover_the_range():
    s, z = qparams(torch.tensor(-2.0), torch.tensor(1.0), symmetric=True)
    assert float(s) == pytest.approx(2 / 127) and int(z) == 0
    s, z = qparams(torch.tensor(0.5), torch.tensor(3.0), symmetric=False)  # widened to contain 0
    assert float(s) == pytest.approx(3 / 255) and int(z) == -128
    x = torch.linspace(0, 3, 1000)
    assert float((fake_quantize(x, s, z) - x).abs().max()) <= float(s) / 2 + 1e-6


def test_errors():
    with pytest.raises(ValueError, match="observer must be one of minmax, percentile, mse, kl"):
        make_observer("max")
    with pytest.raises(ValueError, match="no calibration data"):
        MinMaxObserver().range()
    with pytest.raises(ValueError, match="percentile must be"):
        PercentileObserver(percentile=30)
    assert isinstance(make_observer("kl"), KLObserver) and isinstance(make_observer("mse", per_channel=True), MSEObserver)


def _kl_threshold_bin_one_by_one(h, levels=128):
    """TensorRT's entropy calibration written candidate by candidate: the definition the observer vectorizes."""
    import math

    n, best_i, best_kl = h.numel(), h.numel(), math.inf
    for i in range(levels, n + 1, max(1, n // 1024)):
        p = h[:i].clone()
        p[-1] += h[i:].sum()
        nz = (h[:i] > 0).double()
        level = torch.bucketize(torch.arange(i), torch.linspace(0, i, levels + 1).round().long()[1:-1], right=True)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, h[:i])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, nz)
        q = nz * (mass / count.clamp_min(1))[level]
        if p.sum() == 0 or q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        keep = p > 0
        if bool((q[keep] == 0).any()):
            continue
        kl = float((p[keep] * (p[keep] / q[keep]).log()).sum())
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


@pytest.mark.parametrize("case", ["gaussian", "outliers", "sparse", "few bins"])
def test_kl_threshold_equals_the_candidate_by_candidate_definition(case):
    torch.manual_seed(0)
    x = torch.randn({"sparse": 300}.get(case, 20000))
    if case == "outliers":
        x[:20] *= 50
    obs = KLObserver(bins=1024 if case == "few bins" else 4096)
    obs.add_batch(x[:, None])
    hist, width = obs._abs()
    want = _kl_threshold_bin_one_by_one(hist[0]) * width
    assert float(obs.range()[1]) == pytest.approx(float(want), rel=1e-6)
