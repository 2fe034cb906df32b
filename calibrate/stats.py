"""Statistics collectors fed with layer inputs one batch at a time (`add_batch(x)`)."""

from __future__ import annotations

import torch


class HessianCollector:
    """H = (2 / N) * sum over tokens of x x^T for inputs x of width `n` (GPTQ, SparseGPT).

    Accumulated in float32 as a sum and normalised on read, so the result does
    not depend on how the tokens were split into batches.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, n)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.sum * (2.0 / self.tokens)


class ChannelStats:
    """Per-input-channel mean |x| and mean x^2 (AWQ scales, Wanda norms)."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, n)
        self.abs_sum += x.abs().sum(0)
        self.sq_sum += x.pow(2).sum(0)
        self.tokens += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def l2_norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()
