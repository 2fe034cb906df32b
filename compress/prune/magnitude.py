"""Magnitude pruning: zero the weights of smallest absolute value, the data-free baseline.

Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient
Neural Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02626. Without
retraining, large language models lose much more to it than to methods that
look at activations (Wanda) or reconstruct the layer output (SparseGPT); it is
the reference point those are measured against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import modules_in_turn
from compress import targets as tg
from compress.pipeline import PassReport, Progress
from compress.prune.sparsity import (
    SCOPES,
    SparsityConfig,
    count_zeros,
    prune_mask,
    record_pruned,
    sparsity_report,
)
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig(SparsityConfig):
    scope: str = "layer"  # rank |w| over the whole layer ("layer") or within each output row ("row")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")


@register_pass("magnitude", MagnitudeConfig, streams_blocks=True)
@torch.no_grad()
def run(model: nn.Module, cfg: MagnitudeConfig, calib=None, *, progress: Progress | None = None) -> PassReport:
    """Zero the smallest-magnitude weights of every selected Linear (a fraction, or N:M)."""
    modules = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    zeros: dict[str, tuple[int, int]] = {}
    for name, lin in modules_in_turn(model, modules):  # a lazily loaded model: one block in memory at a time
        try:
            mask = prune_mask(lin.weight.detach().float().abs(), cfg.fraction, cfg.n_m, scope=cfg.scope)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        lin.weight.masked_fill_(mask, 0)
        zeros[name] = count_zeros(lin.weight)
        if progress:
            progress("magnitude", len(zeros), len(modules))
    record_pruned(model, list(zeros), cfg.label)
    log.info("magnitude: pruned %d modules to %s", len(zeros), cfg.label)
    return sparsity_report("magnitude", cfg, zeros)
