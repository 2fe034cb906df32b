"""Wanda: pruning by weights and activations, with no weight update.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024, https://arxiv.org/abs/2306.11695. A weight's
importance is |W_ij| x ||X_j||_2, its magnitude times the norm of its input
feature over the calibration tokens, and weights are compared within each
output row (each row loses the same fraction). Blocks are processed in turn,
each on the outputs of the already-pruned blocks before it, as in the paper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.stats import ChannelStats
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import about
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
class WandaConfig(CalibratedSparsityConfig):
    """Wanda: the shared sparsity target and calibration fields, nothing else."""


def wanda_scores(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """|W| x ||X_j||: (out, in) importance from the weight and the L2 norm of each input feature (in,)."""
    return W.detach().float().abs() * x_norm.float()[None, :]


@register_pass("wanda", WandaConfig, needs_calibration=True, streams_blocks=True)
@torch.no_grad()
def run(model: nn.Module, cfg: WandaConfig, calib: torch.Tensor, *, progress: Progress | None = None) -> PassReport:
    """Prune every selected Linear by |W| x ||X||, per output row, block by block on calibration windows."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    zeros: dict[str, tuple[int, int]] = {}

    def visit(block: Block) -> None:
        # every stage's input norms in one pass over the block, on the pruned blocks' outputs
        stats = block.observe(block.stages, lambda m: (ChannelStats(m.in_features, device=m.weight.device),))
        for st in block.stages:
            norm = stats[st[0]][0].l2_norm
            for n in st:
                W = block.modules[n].weight
                with about(block.name(n)):
                    W.masked_fill_(prune_mask(wanda_scores(W, norm), cfg.fraction, cfg.n_m, scope="row"), 0)
                zeros[block.name(n)] = count_zeros(W)

    walk(model, selected, calib, visit, label="wanda", batch_size=cfg.batch_size, forward_dtype=cfg.forward_dtype,
         progress=progress, min_expert_tokens=cfg.min_expert_tokens)
    record_pruned(model, list(zeros), cfg.label)
    log.info("wanda: pruned %d modules to %s", len(zeros), cfg.label)
    return sparsity_report("wanda", cfg, zeros)
