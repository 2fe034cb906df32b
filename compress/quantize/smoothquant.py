"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth, Han, ICML 2023, https://arxiv.org/abs/2211.10438.
A few input channels of a Linear carry activations 10-100x larger than the
rest, so one per-tensor int8 scale for the activations wastes its range on
them. Dividing channel j of the input by s_j = max|X_j|^a / max|W_j|^(1-a) and
multiplying column j of the weights by s_j leaves the product unchanged and
balances the two ranges (a = 0.5 in the paper; larger a moves more of the
difficulty into the weights). 1/s is folded into the module producing the
input (a norm's weight, or an earlier Linear's rows: `calibrate.fold`), so
nothing extra runs at inference.

With `search`, a is chosen for each stage (the Linears sharing one input)
from `alpha_grid`, or no smoothing at all, as the one whose simulated W8A8
output (per-channel int8 weights, per-tensor activations on the grid of
`search_observer`) is closest to the float output on a sample of the
stage's calibration inputs. The paper tunes one a per model by hand; on the
reference model the best a ranges from 0.3 to 1.0 between stages (MLP down
projections, whose inputs carry the largest outliers, want 0.8-1.0). The
pass changes float weights only: a `w8a8` step follows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import batches
from calibrate.fold import Fold, fold, scale_consumer
from calibrate.forward import ForwardOptions
from calibrate.observers import OBSERVERS, SYMMETRIC_ONLY, fake_quantize, make_observer
from calibrate.stats import ChannelStats
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import check_fields
from compress.pipeline import PassReport, Progress
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(ForwardOptions, tg.Selection):
    alpha: float = 0.5  # migration strength: 0 leaves activations alone, 1 moves all of their range into W
    search: bool = False  # choose alpha per stage from alpha_grid on the stage's simulated W8A8 output error
    alpha_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    search_observer: str = "minmax"  # the activation grid the search simulates (use the w8a8 step's)
    search_tokens: int = 4096  # input rows per stage the search scores on

    def __post_init__(self) -> None:
        super().__post_init__()
        for a in (self.alpha, *self.alpha_grid):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha values must lie in [0, 1], got {a}")
        if self.search and not self.alpha_grid:
            raise ValueError("search needs a non-empty alpha_grid")
        check_fields(self, positive=("search_tokens",), choices={"search_observer": OBSERVERS})


def smoothing_factors(x_max: torch.Tensor, Ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^alpha / max|W_j|^(1 - alpha) for Linears `Ws` (each (out_i, in)) sharing input X."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in Ws]).amax(0)  # (in,)
    s = x_max.float().clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    # a channel that never fired (x_max 0) keeps s = 1: there is nothing to migrate
    return torch.where(x_max > 0, s, torch.ones_like(s)).clamp(1e-4, 1e4)


class TokenSample:
    """Up to `per_batch` evenly spaced token rows of each batch's input (the alpha search's data)."""

    def __init__(self, per_batch: int) -> None:
        self.per_batch, self.rows = per_batch, []

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])  # (tokens, in)
        step = max(1, x.shape[0] // self.per_batch)
        self.rows.append(x[::step][: self.per_batch].float().clone())

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat(self.rows)


def w8a8_output_error(x: torch.Tensor, W: torch.Tensor, s: torch.Tensor, observer: str = "minmax") -> float:
    """||Q(x / s) Q(W diag(s))^T - x W^T||^2 / ||x W^T||^2: W8A8 with per-channel weights and a per-tensor
    activation grid from `observer` (asymmetric; symmetric for KL), after smoothing by s. x (tokens, in), W (out, in)."""
    Ws = W.float() * s  # (out, in)
    w_scale = (Ws.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (out, 1)
    Wq = torch.round(Ws / w_scale).clamp(-127, 127) * w_scale
    xs = x / s
    obs = make_observer(observer, symmetric=observer in SYMMETRIC_ONLY)
    obs.add_batch(xs)
    xq = fake_quantize(xs, *obs.qparams())
    y = x @ W.float().T
    return float((xq @ Wq.T - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


def search_alpha(x: torch.Tensor, x_max: torch.Tensor, Ws: list[torch.Tensor], grid: tuple[float, ...],
                 observer: str = "minmax") -> tuple[float | None, float, float]:
    """The alpha of `grid` whose smoothing gives the least W8A8 output error on the sample x of a stage's input.

    Returns (alpha, its error, the error without smoothing); alpha is None when no smoothing (s = 1) wins.
    """
    W = torch.cat([w.detach().float() for w in Ws])  # (sum out_i, in): the stage's Linears side by side
    base = w8a8_output_error(x, W, torch.ones_like(x_max), observer)
    best, best_err = None, base
    for alpha in grid:
        err = w8a8_output_error(x, W, smoothing_factors(x_max, Ws, alpha), observer)
        if err < best_err:
            best, best_err = alpha, err
    return best, best_err, base


@register_pass("smoothquant", SmoothQuantConfig, needs_calibration=True, streams_blocks=True)
def run(model: nn.Module, cfg: SmoothQuantConfig, calib: torch.Tensor, *,
        progress: Progress | None = None) -> PassReport:
    """Fold SmoothQuant factors into every stage of selected Linears whose input has a foldable producer."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    totals = {"skipped": 0, "unsmoothed": 0, "err_before": 0.0, "err_after": 0.0, "outlier_before": 0.0,
              "outlier_after": 0.0}
    chosen: dict[str, list[float]] = {}  # stage lead module (name inside the block) -> alpha per block
    per_batch = max(1, cfg.search_tokens // batches(calib, cfg.batch_size))

    def visit(block: Block) -> None:
        stats = block.observe(block.stages, lambda m: (ChannelStats(m.in_features, device=m.weight.device),
                                                       *([TokenSample(per_batch)] if cfg.search else [])))
        for st in block.stages:
            producer, st_stats = block.producers()[st[0]], stats.pop(st[0])
            if producer is None or not st_stats[0].tokens:
                totals["skipped"] += 1
                continue
            alpha = _smooth_stage(block, st, producer, st_stats, cfg, totals)
            if alpha is not None:
                chosen.setdefault(st[0], []).append(alpha)

    walk(model, selected, calib, visit, label="smoothquant", batch_size=cfg.batch_size,
         forward_dtype=cfg.forward_dtype, progress=progress, min_expert_tokens=cfg.min_expert_tokens)
    return _report(cfg, totals, chosen, len(selected))


def _report(cfg: SmoothQuantConfig, totals: dict, chosen: dict[str, list[float]], modules: int) -> PassReport:
    smoothed = sum(len(v) for v in chosen.values())
    metrics = {"smoothed_stages": smoothed, "stages_without_producer": totals["skipped"],
               "outlier_ratio_before": totals["outlier_before"] / max(smoothed, 1),
               "outlier_ratio_after": totals["outlier_after"] / max(smoothed, 1),
               **{f"mean_alpha:{k}": sum(v) / len(v) for k, v in chosen.items()}}
    if cfg.search:
        metrics["stages_left_unsmoothed"] = totals["unsmoothed"]
        metrics["search_error_ratio"] = totals["err_after"] / max(totals["err_before"], 1e-30)
    log.info("smoothquant: %d stages smoothed, %d without a foldable producer", smoothed, totals["skipped"])
    return PassReport(name="smoothquant", modules=modules, metrics=metrics)


def _smooth_stage(block: Block, stage: list[str], producer: Fold, stats: tuple, cfg: SmoothQuantConfig,
                  totals: dict) -> float | None:
    """Choose the stage's alpha (or take cfg.alpha) and fold its factors; the alpha, or None when smoothing
    made the stage worse and it was left alone."""
    x_max, Ws = stats[0].max_abs, [block.modules[n].weight for n in stage]
    alpha: float | None = cfg.alpha
    if cfg.search:
        alpha, after, before = search_alpha(stats[1].tokens, x_max, Ws, cfg.alpha_grid, cfg.search_observer)
        totals["err_before"] += before
        totals["err_after"] += after
    if alpha is None:
        totals["unsmoothed"] += 1
        return None
    s = smoothing_factors(x_max, Ws, alpha)
    fold(block.module, producer, s)
    for n in stage:
        scale_consumer(block.modules[n], s)
    # how far the largest channel stands out from the typical one, before and after
    totals["outlier_before"] += float(x_max.max() / x_max.median().clamp_min(1e-8))
    after_max = x_max / s
    totals["outlier_after"] += float(after_max.max() / after_max.median().clamp_min(1e-8))
    return alpha
