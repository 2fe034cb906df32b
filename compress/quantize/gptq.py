"""GPTQ: accurate post-training quantization for generative pre-trained transformers.

Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023, https://arxiv.org/abs/2210.17323.
Columns of each weight are quantized one at a time; the rounding error of a
column is spread over the not-yet-quantized columns through the inverse
Hessian H^-1 of the layer's reconstruction loss ||XW^T - XQ^T||^2
(H = 2 X^T X from calibration inputs). The Cholesky factor of H^-1 gives the
update rows, and updates are applied lazily in blocks of columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.stats import inverse_cholesky_
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import about, check_fields
from compress.pipeline import PassReport, Progress
from compress.prune.sparsity import pruned_modules
from compress.quantize.grid import qparams
from compress.quantize.qlinear import PendingSwaps
from compress.quantize.scheme import CalibratedQuantConfig, QuantScheme
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(CalibratedQuantConfig):
    block_size: int = 128  # columns per lazy batch update (paper: 128)
    dampening: float = 0.01  # fraction of mean diag(H) added to the diagonal (paper: 1 %)
    act_order: bool = True  # quantize columns by decreasing diag(H); groups stay static
    true_sequential: bool = True  # within a block, re-collect inputs after each stage is quantized

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("block_size",), fraction=("dampening",))


def quantize_weight(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, *, block_size: int = 128,
                    dampening: float = 0.01, act_order: bool = True, zeros: torch.Tensor | None = None,
                    updated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ for one weight W (out, in) with Hessian H (in, in).

    Returns unsigned codes (out, in) int32, scale and zero (out, n_groups), and
    the loss sum over columns of ((w - q)^2 / [H^-1]_jj^2) / 2 (as in the paper's code).
    With `act_order` the group parameters are computed up front from W (static
    groups), so groups stay contiguous in the original column order. `zeros`
    (out, in) bool marks weights that must come out exactly zero (pruned ones):
    they get their group's zero point, and their error is spread like any
    rounding error, as in SparseGPT's joint sparsification and quantization.
    `updated` (out, in), when given, receives the weights each column was rounded from (the original weights
    plus the error compensation of the columns before it): rounding them to the nearest gives the codes.
    """
    W = W.detach().float().clone()
    out, n = W.shape
    g, ng = scheme.group_len(n), scheme.n_groups(n)

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    W[:, dead] = 0.0

    column_scheme = QuantScheme(bits=scheme.bits, group_size=-1, symmetric=scheme.symmetric,
                                scale_dtype=scheme.scale_dtype)
    if act_order:  # static groups: from the (dead-column-zeroed) weights before any update
        scale, zero = qparams(W, scheme)
        perm = torch.argsort(torch.diag(H).float().masked_fill(dead, 1.0), descending=True)
        W = W[:, perm]
        H = H.detach().index_select(0, perm)  # our own permuted copy, rows then columns:
        H = H.index_select(1, perm).float()  # never three n x n matrices at once
        dead = dead[perm]
        zeros = zeros[:, perm] if zeros is not None else None
        group_of = (perm // g).tolist()  # (in,) original group of each permuted column
    else:  # each group's grid is set when its first column comes up
        H = H.detach().float().clone()
        scale, zero = torch.empty(out, ng), torch.empty(out, ng)
        perm = None
        group_of = [j // g for j in range(n)]
    H.diagonal()[dead] = 1.0

    Hinv = inverse_cholesky_(H, dampening)  # in place in our copy of H

    Q = torch.zeros(out, n, dtype=torch.int32)
    loss = torch.zeros(out)
    qmax = scheme.qmax
    hdiag = Hinv.diagonal().tolist()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Q1 = torch.zeros_like(W1)
        U1 = torch.empty_like(W1) if updated is not None else None
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            gi = group_of[j]
            if not act_order and j % g == 0:  # first column of a group: its grid from current weights
                s, z = qparams(_group_slice(W, W1, i1, i2, j, g), column_scheme)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            w, s, z = W1[:, i], scale[:, gi], zero[:, gi]
            if U1 is not None:
                U1[:, i] = w
            q = torch.round(w / s).add_(z).clamp_(0, qmax)
            if zeros is not None:
                q = torch.where(zeros[:, j], z, q)  # a pruned weight stays zero: (z - z) * s
            err = (w - (q - z) * s).div_(hdiag[j])  # rounding error over [H^-1]_jj
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # spread the error over the block's later columns
            Q1[:, i] = q
            Err1[:, i] = err
        Q[:, i1:i2] = Q1.to(torch.int32)
        if U1 is not None:
            updated[:, i1:i2] = U1  # in the permuted order until the end
        loss += Err1.pow(2).sum(1) / 2  # ((w - q)^2 / [H^-1]_jj^2) / 2 per column
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the remaining columns

    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        if updated is not None:
            updated.copy_(updated[:, inverse])
    return Q, scale, zero, float(loss.sum())


def _group_slice(W: torch.Tensor, W1: torch.Tensor, i1: int, i2: int, j: int, g: int) -> torch.Tensor:
    """Current weights of the group starting at column j: the in-block part is in W1, the rest in W."""
    end = min(j + g, W.shape[1])
    inside = W1[:, j - i1 : min(end, i2) - i1]
    return inside if end <= i2 else torch.cat([inside, W[:, i2:end]], dim=1)


def quantize_blocks(model: nn.Module, cfg: GPTQConfig, calib: torch.Tensor,
                    scheme_for: Callable[[str], QuantScheme], *, label: str = "gptq",
                    progress: Progress | None = None) -> tuple[int, float, int, int]:
    """GPTQ over the decoder blocks, each selected Linear on the scheme `scheme_for(full name)`.

    Weights that a pruning pass set to zero (`compress.prune.sparsity.pruned_modules`)
    stay zero. Returns (modules, summed loss, storage bits, weights).
    """
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    sparse = pruned_modules(model)
    pending = PendingSwaps()  # a block's Linears become QuantLinears once the block has fed the next one
    total = {"loss": 0.0, "bits": 0, "weights": 0}

    def visit(block: Block) -> None:
        for n, H in block.hessians(sequential=cfg.true_sequential):
            lin, name = block.modules[n], block.name(n)
            scheme, keep = scheme_for(name), (lin.weight == 0) if name in sparse else None
            with about(name):
                q, scale, zero, loss = quantize_weight(lin.weight, H, scheme, block_size=cfg.block_size,
                                                       dampening=cfg.dampening, act_order=cfg.act_order, zeros=keep)
            del H  # the stage's last module held the only reference: freed before the next stage's
            pending.add(n, lin, q, scale, zero, scheme)
            total["loss"] += loss
            total["weights"] += q.numel()

    def commit(module: nn.Module) -> None:
        total["bits"] += pending.commit(module)

    walk(model, selected, calib, visit, label=label, batch_size=cfg.batch_size, forward_dtype=cfg.forward_dtype,
         progress=progress, after=commit, min_expert_tokens=cfg.min_expert_tokens)
    log.info("%s: quantized %d modules, loss %.4g", label, len(selected), total["loss"])
    return len(selected), total["loss"], total["bits"], total["weights"]


@register_pass("gptq", GPTQConfig, needs_calibration=True, streams_blocks=True)
def run(model: nn.Module, cfg: GPTQConfig, calib: torch.Tensor, *, progress: Progress | None = None) -> PassReport:
    """Quantize selected Linears block by block with GPTQ on calibration token windows `calib` (samples, seq_len)."""
    scheme = cfg.scheme
    done, total_loss, bits, weights = quantize_blocks(model, cfg, calib, lambda name: scheme, progress=progress)
    return PassReport(name="gptq", modules=done,
                      metrics={"gptq_loss": total_loss, "bits_per_weight": bits / max(weights, 1)})
