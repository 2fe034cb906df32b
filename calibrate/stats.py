"""Statistics collectors fed with layer inputs one batch at a time (`add_batch(x)`)."""

from __future__ import annotations

import torch


class HessianCollector:
    """H = (2 / N) * sum over tokens of x x^T for inputs x of width `n` (GPTQ, SparseGPT).

    Accumulated in float32 as a sum and normalised on read, so the result does
    not depend on how the tokens were split into batches. X^T X is symmetric,
    so only its lower triangle is computed (by row panels, about 60 % of the
    multiply-adds of the full product for wide inputs) and mirrored on read.
    """

    PANEL = 384  # columns per row panel; at most 4 panels (more and the GEMMs get too small to pay)

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=device)  # lower triangle is valid
        self.tokens = 0
        k = min(4, max(1, round(n / self.PANEL)))
        self._bounds = [round(i * n / k) for i in range(k + 1)]

    @classmethod
    def of(cls, linear: torch.nn.Module) -> tuple[HessianCollector]:
        """The statistics `Block.observe` collects for a stage read by `linear`: its input Hessian."""
        return (cls(linear.in_features, device=linear.weight.device),)

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, n)
        b = self._bounds
        for i in range(len(b) - 1):  # panel i: its rows, every column up to its diagonal block's end
            self.sum[b[i] : b[i + 1], : b[i + 1]].addmm_(x[:, b[i] : b[i + 1]].T, x[:, : b[i + 1]])
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        b = self._bounds
        for i in range(len(b) - 1):  # mirror in place, panel by panel: no full-size temporaries
            rows = self.sum[b[i] : b[i + 1]]
            rows[:, b[i + 1] :] = self.sum[b[i + 1] :, b[i] : b[i + 1]].T
            diag = rows[:, b[i] : b[i + 1]].tril()  # the diagonal block, exactly symmetric too
            rows[:, b[i] : b[i + 1]] = diag + diag.tril(-1).T
        return self.sum * (2.0 / self.tokens)

    def take(self) -> torch.Tensor:
        """`hessian`, normalised in place and handed over: the collector keeps no reference to it (a
        5632-wide Hessian is 121 MiB; the caller decides when it is freed)."""
        H = self.hessian
        self.sum = None
        return H


class ChannelStats:
    """Per-input-channel mean |x|, mean x^2 and max |x| (AWQ scales, Wanda norms, SmoothQuant ranges)."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.max_abs = torch.zeros(n, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, n)
        # float32 within a batch (pairwise summation), float64 across batches
        self.abs_sum += x.abs().sum(0)
        self.sq_sum += x.square().sum(0)
        torch.maximum(self.max_abs, x.abs().amax(0), out=self.max_abs)
        self.tokens += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    @property
    def l2_norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


def inverse_cholesky_(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """In place: the upper Cholesky factor of (H + damp I)^-1, whose row j holds column j's update coefficients.

    `H` (in, in) must be the caller's own float copy (a 5632-wide down_proj
    Hessian is 121 MiB, so no second one is made); damp is `dampening` times
    the mean of diag(H).
    """
    if not bool(torch.isfinite(H).all()):
        raise ValueError("the calibration Hessian has non-finite values: the layer's inputs overflow float32 "
                         "on the calibration data")
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    try:
        torch.linalg.cholesky(H, out=H)
        torch.cholesky_inverse(H, out=H)
        return torch.linalg.cholesky(H, upper=True, out=H)
    except torch.linalg.LinAlgError:
        raise ValueError(f"the calibration Hessian is not positive definite even with dampening {dampening:g} "
                         "(inputs of extreme range); raise dampening") from None
