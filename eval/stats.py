"""Confidence intervals and paired tests for eval results (numpy only, deterministic seeds).

Perplexity is a ratio of sums over windows, exp(sum NLL / sum tokens), so its
uncertainty comes from a bootstrap over windows (resampling whole windows keeps
the dependence between tokens of one window); so does a mean of per-window
values (embedding cosine). Accuracy gets the Wilson score interval. Two
results on the same items are compared item by item: a paired bootstrap over
windows for perplexity and per-window means, the exact McNemar test for
accuracy (only questions where the two models disagree carry information).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000  # bootstrap resamples: the 2.5 % tail holds 50 of them
SEED = 0


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def perplexity_ci(nll: np.ndarray, tokens: np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT,
                  seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of exp(sum nll / sum tokens) over windows (nll: per-window sums)."""
    nll, tokens = np.asarray(nll, np.float64), np.asarray(tokens, np.float64)
    if len(nll) < 2:
        v = math.exp(nll.sum() / tokens.sum())
        return v, v  # one window: nothing to resample
    idx = _resamples(len(nll), n_boot, seed)
    boot = np.exp(nll[idx].sum(1) / tokens[idx].sum(1))  # (n_boot,)
    a = (1 - level) / 2
    return float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))


def mean_ci(x: np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values (an embedding cosine per window)."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        return float(x.mean()), float(x.mean())  # one item: nothing to resample
    boot = x[_resamples(len(x), n_boot, seed)].mean(1)  # (n_boot,)
    a = (1 - level) / 2
    return float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))


def wilson_ci(correct: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    z = _z(level)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(level: float) -> float:
    """Two-sided normal quantile for `level` (bisection on erf: no scipy needed)."""
    target = 1 - (1 - level) / 2
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedResult:
    """A candidate against a baseline on the same items."""

    # perplexity: relative rise (0.05 = +5 %); accuracy: drop in points (1.0 = -1 point); a mean (embedding
    # cosine): its drop (0.01 = from 1.00 to 0.99)
    change: float
    ci95: tuple[float, float]  # interval of `change`
    p_value: float  # one-sided: probability of a change this bad or worse if the candidate were no worse
    test: str


def paired_perplexity(nll_c: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray, *, n_boot: int = N_BOOT,
                      seed: int = SEED) -> PairedResult:
    """Relative perplexity rise of the candidate over the baseline, paired bootstrap over windows.

    The p-value is the bootstrap estimate of P(rise <= 0): small when the
    candidate is worse on nearly every resample of the windows.
    """
    nll_c, nll_b = np.asarray(nll_c, np.float64), np.asarray(nll_b, np.float64)
    tokens = np.asarray(tokens, np.float64)
    rise = math.exp((nll_c.sum() - nll_b.sum()) / tokens.sum()) - 1
    if len(tokens) < 2:
        return PairedResult(rise, (rise, rise), 0.0 if rise > 0 else 1.0, "paired bootstrap (1 window)")
    idx = _resamples(len(tokens), n_boot, seed)
    boot = np.exp((nll_c[idx].sum(1) - nll_b[idx].sum(1)) / tokens[idx].sum(1)) - 1  # (n_boot,)
    p = (np.count_nonzero(boot <= 0) + 1) / (n_boot + 1) if rise > 0 else 1.0
    return PairedResult(rise, (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))), float(p),
                        f"paired bootstrap over {len(tokens)} windows, {n_boot} resamples")


def paired_mean_drop(values_c: np.ndarray, values_b: np.ndarray, *, n_boot: int = N_BOOT,
                     seed: int = SEED) -> PairedResult:
    """Drop of the candidate's mean below the baseline's, for per-item values where higher is better
    (embedding cosine per window), paired bootstrap over items; the p-value is the bootstrap P(drop <= 0)."""
    d = np.asarray(values_b, np.float64) - np.asarray(values_c, np.float64)  # (n,) per-item drop
    drop = float(d.mean())
    if len(d) < 2:
        return PairedResult(drop, (drop, drop), 0.0 if drop > 0 else 1.0, "paired bootstrap (1 window)")
    boot = d[_resamples(len(d), n_boot, seed)].mean(1)  # (n_boot,)
    p = (np.count_nonzero(boot <= 0) + 1) / (n_boot + 1) if drop > 0 else 1.0
    return PairedResult(drop, (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))), float(p),
                        f"paired bootstrap over {len(d)} windows, {n_boot} resamples")


def mcnemar(correct_c: np.ndarray, correct_b: np.ndarray) -> PairedResult:
    """Accuracy drop of the candidate in points, with the exact one-sided McNemar test.

    Of the n questions where the two disagree, b were lost by the candidate and
    c gained; if the candidate were no worse, b ~ Binomial(n, 1/2), so
    p = P(X >= b). The interval is the Wald interval of the paired difference.
    """
    cc, cb = np.asarray(correct_c, bool), np.asarray(correct_b, bool)
    n_items = len(cc)
    lost = int(np.count_nonzero(cb & ~cc))
    gained = int(np.count_nonzero(~cb & cc))
    n = lost + gained
    drop = 100.0 * (lost - gained) / max(n_items, 1)
    p = sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n if n else 1.0
    # variance of the mean paired difference d_i in {-1, 0, 1}
    d = (cb.astype(np.float64) - cc.astype(np.float64))
    se = 100.0 * float(d.std(ddof=1)) / math.sqrt(n_items) if n_items > 1 else 0.0
    return PairedResult(drop, (drop - 1.96 * se, drop + 1.96 * se), float(min(p, 1.0)),
                        f"exact McNemar ({lost} lost, {gained} gained of {n_items})")
