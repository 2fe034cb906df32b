import math

import numpy as np
import pytest

from eval.stats import mcnemar, paired_perplexity, perplexity_ci, wilson_ci


def test_perplexity_ci_brackets_the_estimate_and_shrinks_with_more_windows():
    rng = np.random.default_rng(1)
    widths = []
    for n in (16, 256):
        nll = rng.normal(3.0, 0.3, n) * 100  # per-window NLL sums of 100 tokens
        tok = np.full(n, 100)
        lo, hi = perplexity_ci(nll, tok)
        point = math.exp(nll.sum() / tok.sum())
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n)


def test_wilson_interval_known_values():
    lo, hi = wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_ci(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_ci(10, 10)[1] == pytest.approx(1.0)


def test_paired_perplexity_identical_is_no_change():
    nll = np.random.default_rng(0).normal(300, 20, 64)
    r = paired_perplexity(nll, nll, np.full(64, 100))
    assert r.change == 0.0 and r.p_value == 1.0 and r.ci95 == (0.0, 0.0)


def test_paired_perplexity_detects_a_small_consistent_rise_but_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(300, 30, 64)  # windows differ a lot from each other ...
    tok = np.full(64, 100)
    worse = base + 3.0  # ... but the candidate is worse on every window by 1 % of its NLL
    r = paired_perplexity(worse, base, tok)
    assert r.change == pytest.approx(math.exp(3 * 64 / 6400) - 1)
    assert r.p_value < 0.01 and r.ci95[0] > 0
    noisy = base + rng.normal(0, 3.0, 64)  # no systematic change
    r2 = paired_perplexity(noisy, base, tok)
    assert r2.p_value > 0.05 or r2.change <= 0


def test_mcnemar_exact_p_value():
    base = np.array([True] * 10 + [False] * 10)
    cand = base.copy()
    cand[:6] = False  # lost 6
    cand[10:11] = True  # gained 1
    r = mcnemar(cand, base)
    assert r.change == pytest.approx(100 * 5 / 20)
    # P(X >= 6), X ~ Bin(7, 1/2) = (7 + 1) / 128
    assert r.p_value == pytest.approx(8 / 128)
    same = mcnemar(base, base)
    assert same.change == 0 and same.p_value == 1.0
