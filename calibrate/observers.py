"""Range observers for int8 activation quantization: min/max, percentile, MSE-optimal and KL (entropy) clipping.

An observer sees calibration batches (`add_batch(x)`, x of shape (..., channels))
and returns the range to quantize to (`range()`: lo, hi per tensor, or per
channel of the last dimension), from which `qparams` makes the int8 scale and
zero point. Min/max keeps the extremes (optionally as a moving average, as
PyTorch's MovingAverageMinMaxObserver). The others clip outliers from a
histogram that grows with the data: percentile keeps the given fraction of
values; MSE picks the clipping threshold with the least expected quantization
error, clipping plus rounding (as in Banner et al., "Post-training 4-bit
quantization", 2019, https://arxiv.org/abs/1810.05723); KL picks the threshold
whose quantized distribution is closest in relative entropy to the observed
one (Migacz, "8-bit Inference with TensorRT", GTC 2017).
"""

from __future__ import annotations

import math

import torch

OBSERVERS = ("minmax", "percentile", "mse", "kl")


def qparams(lo: torch.Tensor, hi: torch.Tensor, *, symmetric: bool = True,
            bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (signed integer grid [-2^(b-1), 2^(b-1) - 1]) covering [lo, hi].

    Symmetric: zero 0 and scale max(|lo|, |hi|) / (2^(b-1) - 1). Asymmetric: the
    range is widened to contain 0 (so zero padding is exact), scale
    (hi - lo) / (2^b - 1) and zero point round(qmin - lo / scale).
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = lo.float(), hi.float()
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-12) / qmax
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
    zero = (qmin - lo / scale).round().clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize x on the grid (scale, zero), broadcasting them over x's last dimension."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return ((x / scale).round() + zero).clamp(qmin, qmax).sub(zero) * scale


class Observer:
    """Base: per-tensor or per-channel (last dimension) statistics of the batches seen."""

    symmetric_only = False  # True: defined for a symmetric grid only (refused otherwise)

    def __init__(self, *, per_channel: bool = False, symmetric: bool = True, bits: int = 8) -> None:
        self.per_channel, self.symmetric, self.bits = per_channel, symmetric, bits
        self.batches = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as (channels, values): one row per channel, or a single row for the whole tensor."""
        x = x.detach().float()
        return x.reshape(-1, x.shape[-1]).T if self.per_channel else x.reshape(1, -1)

    def add_batch(self, x: torch.Tensor) -> None:
        self._add(self._rows(x))
        self.batches += 1

    def _add(self, rows: torch.Tensor) -> None:
        raise NotImplementedError  # every concrete observer defines it

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi), each (channels,) or a scalar tensor."""
        if self.batches == 0:
            raise ValueError(f"{type(self).__name__}: no calibration data reached this observer")
        lo, hi = self._range()
        return (lo, hi) if self.per_channel else (lo.reshape(()), hi.reshape(()))

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*self.range(), symmetric=self.symmetric, bits=self.bits)


class MinMaxObserver(Observer):
    """The smallest and largest value seen; with `averaging` c, a moving average lo += c (batch_lo - lo)."""

    def __init__(self, *, averaging: float | None = None, **kw) -> None:
        super().__init__(**kw)
        if averaging is not None and not 0 < averaging <= 1:
            raise ValueError(f"averaging must be in (0, 1], got {averaging}")
        self.averaging = averaging
        self.lo = self.hi = None

    def _add(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.averaging is None:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            self.lo = self.lo + self.averaging * (lo - self.lo)
            self.hi = self.hi + self.averaging * (hi - self.hi)

    def _range(self):
        return self.lo, self.hi


class HistogramObserver(Observer):
    """A histogram of the values over [-R, R] per row, R doubling (bins merged pairwise) as larger values come.

    Doubling keeps old counts exact: old bin i of B lands in new bin B/4 + i // 2.
    """

    def __init__(self, *, bins: int = 4096, **kw) -> None:
        super().__init__(**kw)
        if bins < 256 or bins % 4:
            raise ValueError(f"bins must be a multiple of 4, at least 256, got {bins}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # (rows, bins) counts, float64
        self.radius: torch.Tensor | None = None  # (rows,) R

    def _add(self, rows: torch.Tensor) -> None:
        amax = rows.abs().amax(1).double().clamp_min(1e-12)
        if self.hist is None:
            self.hist = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=rows.device)
            self.radius = amax
        while bool((grow := amax > self.radius).any()):  # double R where this batch reaches past it
            merged = torch.zeros_like(self.hist[grow])
            merged[:, self.bins // 4 : 3 * self.bins // 4] = self.hist[grow].view(-1, self.bins // 2, 2).sum(-1)
            self.hist[grow] = merged
            self.radius = torch.where(grow, self.radius * 2, self.radius)
        width = 2 * self.radius / self.bins  # (rows,)
        idx = ((rows.double() + self.radius[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).long()
        idx += torch.arange(rows.shape[0], device=rows.device)[:, None] * self.bins  # (rows, values) flat bins
        self.hist.view(-1).scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64,
                                                                         device=rows.device))

    def _centers(self) -> torch.Tensor:
        """(rows, bins) bin centres."""
        i = torch.arange(self.bins, dtype=torch.float64, device=self.hist.device)
        return -self.radius[:, None] + (i + 0.5) * (2 * self.radius / self.bins)[:, None]

    def _abs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of |x| (rows, bins / 2) over [0, R] and its bin width."""
        half = self.bins // 2
        return self.hist[:, half:] + self.hist[:, :half].flip(1), self.radius / half

    def _range(self):
        if self.symmetric:
            t = self._threshold()
            return -t, t
        return self._asymmetric()

    def _threshold(self) -> torch.Tensor:
        raise NotImplementedError

    def _asymmetric(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _quantile(hist: torch.Tensor, q: float, lo: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Value below which a fraction q of each row's histogram lies, interpolated inside the bin."""
    cdf = hist.cumsum(1)
    target = q * cdf[:, -1:]
    i = torch.searchsorted(cdf, target).clamp(max=hist.shape[1] - 1)  # (rows, 1) first bin reaching it
    below = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(target))
    inside = hist.gather(1, i).clamp_min(1e-12)
    frac = ((target - below) / inside).clamp(0, 1)
    return (lo[:, None] + (i + frac) * width[:, None]).squeeze(1)


class PercentileObserver(HistogramObserver):
    """Clip to the `percentile` of |x| (symmetric), or to the (100 - p)th and pth percentiles of x."""

    def __init__(self, *, percentile: float = 99.99, **kw) -> None:
        super().__init__(**kw)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _threshold(self):
        hist, width = self._abs()
        return _quantile(hist, self.percentile / 100, torch.zeros_like(width), width).float()

    def _asymmetric(self):
        width = 2 * self.radius / self.bins
        q = self.percentile / 100
        lo = _quantile(self.hist, 1 - q, -self.radius, width)
        hi = _quantile(self.hist, q, -self.radius, width)
        return lo.float(), hi.float()


class MSEObserver(HistogramObserver):
    """The clipping range with the least expected squared error: clipped values' distance to the edge plus
    the uniform rounding noise step^2 / 12 of the values inside, over `candidates` shrinking ranges."""

    def __init__(self, *, candidates: int = 200, min_ratio: float = 0.05, **kw) -> None:
        super().__init__(**kw)
        self.candidates, self.min_ratio = candidates, min_ratio

    def _ratios(self) -> torch.Tensor:
        return torch.linspace(self.min_ratio, 1.0, self.candidates, dtype=torch.float64, device=self.hist.device)

    def _best(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate (lo, hi) of least expected error per row; candidates are (rows, k)."""
        centers = self._centers()
        chunk = max(1, 2**24 // (lo.shape[1] * self.bins))  # rows at a time: (chunk, k, bins) float64 temporaries
        best = []
        for r in range(0, lo.shape[0], chunk):
            c = centers[r:r + chunk, None, :]  # (rows, 1, bins)
            n = self.hist[r:r + chunk, None, :]
            a, b = lo[r:r + chunk, :, None], hi[r:r + chunk, :, None]  # (rows, k, 1)
            step = (b - a) / (2**self.bits - 1)
            outside = (c - b).clamp(min=0) + (a - c).clamp(min=0)  # distance of a clipped value to the edge
            err = (n * torch.where(outside > 0, outside.square(), step.square() / 12)).sum(-1)  # (rows, k)
            best.append(err.argmin(1, keepdim=True))
        i = torch.cat(best)
        return lo.gather(1, i).squeeze(1).float(), hi.gather(1, i).squeeze(1).float()

    def _threshold(self):
        t = self.radius[:, None] * self._ratios()[None, :]  # (rows, k)
        return self._best(-t, t)[1]

    def _asymmetric(self):
        # each end shrinks towards zero by the same factor of its own extent (a 1-D search, as for symmetric)
        width = 2 * self.radius / self.bins
        occupied = self.hist > 0
        first = occupied.float().argmax(1)
        last = self.bins - 1 - occupied.flip(1).float().argmax(1)
        lo_obs = (-self.radius + first * width).clamp(max=0)
        hi_obs = (-self.radius + (last + 1) * width).clamp(min=0)
        r = self._ratios()[None, :]
        return self._best(lo_obs[:, None] * r, hi_obs[:, None] * r)


class KLObserver(HistogramObserver):
    """TensorRT's entropy calibration on the |x| histogram: for each candidate threshold, fold the tail into the
    last bin (P), merge the kept bins into 2^(bits-1) levels spread back over their non-empty bins (Q), and keep
    the threshold of least KL(P || Q). Per tensor and symmetric, as TensorRT defines it."""

    symmetric_only = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        if self.per_channel or not self.symmetric:
            raise ValueError("the KL observer is per tensor and symmetric (TensorRT's entropy calibration); "
                             "use percentile or mse per channel or asymmetric")

    def _threshold(self):
        hist, width = self._abs()
        h = hist[0]  # (bins / 2,)
        levels = 2 ** (self.bits - 1)
        n = h.numel()
        candidates = torch.arange(levels, n + 1, max(1, n // 1024), device=h.device)
        chunk = max(1, (1 << 22) // n)  # candidates scored at once: ~4M bins of float64 per temporary
        kls = torch.cat([_entropy_kl(h, candidates[c:c + chunk], levels) for c in range(0, candidates.numel(), chunk)])
        if not bool(torch.isfinite(kls).any()):
            return (n * width).float()
        return (int(candidates[int(torch.argmin(kls))]) * width).float()  # argmin: the first of equal minima


def _entropy_kl(h: torch.Tensor, ends: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) of TensorRT's entropy calibration for each candidate threshold bin `ends[c]` of the |x|
    histogram h (inf where undefined), all candidates at once: P is h[:i] with the tail h[i:] folded into its last
    bin; Q merges h[:i] into `levels` levels (bin k in level l when edge_l <= k < edge_l+1, edges = round(linspace(0,
    i, levels + 1))) and spreads each level's mass evenly over its non-empty bins."""
    n = h.numel()
    k = torch.arange(n, device=h.device)
    inside = k[None, :] < ends[:, None]  # (C, n): bin k below candidate c's threshold
    hk = torch.where(inside, h[None, :], torch.zeros((), dtype=h.dtype, device=h.device))
    # inner level edges round(i * j / levels), j = 1..levels-1 (exact in float64, as linspace's are for these sizes)
    edges = torch.round(ends[:, None].double() * torch.arange(1, levels, device=h.device) / levels).long()
    level = torch.searchsorted(edges, k.expand(ends.numel(), n).contiguous(), right=True)  # (C, n)
    nz = (hk > 0).to(h.dtype)
    mass = torch.zeros(ends.numel(), levels, dtype=h.dtype, device=h.device).scatter_add_(1, level, hk)
    count = torch.zeros_like(mass).scatter_add_(1, level, nz)
    q = nz * (mass / count.clamp_min(1)).gather(1, level)
    p = hk.clone()
    tail = h.sum() - torch.cumsum(h, 0)[ends - 1]  # h[i:].sum() per candidate
    p.scatter_add_(1, (ends - 1)[:, None], tail[:, None])
    ps, qs = p.sum(1, keepdim=True), q.sum(1, keepdim=True)
    p, q = p / ps.clamp_min(1e-300), q / qs.clamp_min(1e-300)
    keep = p > 0
    terms = torch.where(keep, p * (p / torch.where(keep, q, torch.ones_like(q))).log(), torch.zeros_like(p))
    kl = terms.sum(1)
    bad = (keep & (q == 0)).any(1) | (ps[:, 0] == 0) | (qs[:, 0] == 0)
    return kl.masked_fill(bad, math.inf)


_CLASSES = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver, "kl": KLObserver}
# the observers a symmetric grid must be chosen for (the w8a8 preset, its config check, the SmoothQuant search)
SYMMETRIC_ONLY = frozenset(name for name, cls in _CLASSES.items() if cls.symmetric_only)


def make_observer(name: str, **kw) -> Observer:
    """An observer by name (minmax, percentile, mse, kl) with its options."""
    if name not in _CLASSES:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {name!r}")
    return _CLASSES[name](**kw)
