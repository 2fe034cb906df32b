"""Merge math for LoRA deltas: one adapter (LoRA, DoRA) and several (weighted sum, TIES).

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): W' = W + s * B @ A
with s = alpha / r (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r)).
DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): the adapted
direction is renormalised per output row and scaled by the learned magnitude,
W' = m / ||W + s B A||_row * (W + s B A).
TIES-Merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708) combines
task deltas by trimming each to its largest-magnitude entries, electing a
sign per entry from the summed deltas, and averaging only the deltas that
agree with it. Here it works on the full deltas B @ A of each module, not on
the factors separately, so the combination is exactly the paper's.
"""

from __future__ import annotations

import math

import torch

COMBINATIONS = ("linear", "ties")


def dora_weight(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight (out, in): each row of W + delta rescaled to norm magnitude[row]."""
    V = W.float() + delta  # (out, in)
    norm = torch.linalg.vector_norm(V, dim=1)  # (out,)
    return V * (magnitude.float() / norm)[:, None]


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * numel) largest-magnitude entries of `delta`, zero the rest (exact count)."""
    k = max(1, min(delta.numel(), math.ceil(density * delta.numel())))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-merge weighted deltas: trim each, elect the sign of the sum, average the agreeing entries."""
    tau = torch.stack([w * trim(d.float(), density) for d, w in zip(deltas, weights, strict=True)])  # (n, out, in)
    sign = torch.sign(tau.sum(0))  # (out, in) the elected sign; 0 where nothing survives
    agree = (torch.sign(tau) == sign) & (tau != 0)  # (n, out, in)
    count = agree.sum(0).clamp(min=1)
    return (tau * agree).sum(0) / count


def combine(deltas: list[torch.Tensor], weights: list[float], method: str, density: float) -> torch.Tensor:
    """One delta from several adapters' deltas of the same module."""
    if method == "linear":
        out = torch.zeros_like(deltas[0], dtype=torch.float32)
        for d, w in zip(deltas, weights, strict=True):
            out += w * d.float()
        return out
    if method == "ties":
        return ties(deltas, weights, density)
    raise ValueError(f"method must be one of {', '.join(COMBINATIONS)}, got {method!r}")
