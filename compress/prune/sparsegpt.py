"""SparseGPT: one-shot pruning with the optimal (OBS) update of the remaining weights.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", ICML 2023, https://arxiv.org/abs/2301.00774. Like GPTQ, each
layer is solved column by column from the Hessian H = 2 X^T X of its inputs:
a pruned weight's removal error is spread over the not-yet-processed columns
through the Cholesky factor of H^-1. The mask is chosen adaptively, per block
of columns, from the saliency w^2 / [H^-1]_jj^2 of the weights as updated so
far (N:M: per group of M columns as it comes up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.stats import inverse_cholesky_
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import about, check_fields
from compress.pipeline import PassReport, Progress
from compress.prune.sparsity import (
    CalibratedSparsityConfig,
    count_zeros,
    prune_mask,
    record_pruned,
    sparsity_report,
)
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SparseGPTConfig(CalibratedSparsityConfig):
    block_size: int = 128  # columns per mask selection and lazy batch update (paper: 128)
    dampening: float = 0.01  # fraction of mean diag(H) added to the diagonal (paper: 1 %)
    true_sequential: bool = True  # within a block, re-collect inputs after each stage is pruned

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("block_size",), fraction=("dampening",))


def prune_weight(W: torch.Tensor, H: torch.Tensor, fraction: float, n_m: tuple[int, int] | None = None, *,
                 block_size: int = 128, dampening: float = 0.01) -> tuple[torch.Tensor, float]:
    """SparseGPT for one weight W (out, in) with Hessian H (in, in).

    Returns the pruned and updated weight (float32; exactly round(fraction *
    out * in) zeros, or N:M) and the loss sum of (w^2 / [H^-1]_jj^2) / 2 over
    pruned weights.
    """
    W = W.detach().float().clone()
    out, n = W.shape
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any weight there is free to prune
    H.diagonal()[dead] = 1.0
    Hinv = inverse_cholesky_(H, dampening)

    if n_m is not None:
        m = n_m[1]
        if n % m:
            raise ValueError(f"an N:M pattern needs the input size to be a multiple of M; {n} is not one of {m}")
        block_size = max(m, block_size - block_size % m)  # groups of M never straddle two blocks
    loss = torch.zeros(out)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (b,)
        if n_m is None:  # this block's share of the layer's count, rounded cumulatively: exact in total
            k = round(fraction * out * i2) - round(fraction * out * i1)
            mask1 = prune_mask(W1.square() / d.square(), k / W1.numel(), scope="layer") if k else \
                torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:  # the next group of M columns, from the current weights
                cols = slice(i, i + n_m[1])
                mask1[:, cols] = prune_mask(W1[:, cols].square() / d[cols].square(), 0.0, n_m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # spread the removal error over later columns
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        loss += Err1.pow(2).sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the remaining columns
    return W, float(loss.sum())


@register_pass("sparsegpt", SparseGPTConfig, needs_calibration=True, streams_blocks=True)
@torch.no_grad()
def run(model: nn.Module, cfg: SparseGPTConfig, calib: torch.Tensor, *,
        progress: Progress | None = None) -> PassReport:
    """Prune every selected Linear with SparseGPT, block by block on calibration windows `calib`."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    zeros: dict[str, tuple[int, int]] = {}
    total_loss = 0.0

    def visit(block: Block) -> None:
        nonlocal total_loss
        for n, H in block.hessians(sequential=cfg.true_sequential):
            lin, name = block.modules[n], block.name(n)
            with about(name):
                W, loss = prune_weight(lin.weight, H, cfg.fraction, cfg.n_m, block_size=cfg.block_size,
                                       dampening=cfg.dampening)
            del H  # the stage's last module held the only reference: freed before the next stage's
            lin.weight.copy_(W.to(lin.weight.dtype))
            zeros[name] = count_zeros(lin.weight)
            total_loss += loss

    walk(model, selected, calib, visit, label="sparsegpt", batch_size=cfg.batch_size,
         forward_dtype=cfg.forward_dtype, progress=progress, min_expert_tokens=cfg.min_expert_tokens)
    record_pruned(model, list(zeros), cfg.label)
    log.info("sparsegpt: pruned %d modules to %s, loss %.4g", len(zeros), cfg.label, total_loss)
    return sparsity_report("sparsegpt", cfg, zeros, metrics={"sparsegpt_loss": total_loss})
