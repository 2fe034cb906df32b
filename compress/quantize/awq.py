"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, MLSys 2024,
https://arxiv.org/abs/2306.00978. A few input channels carry large
activations; scaling their weight columns up by s (and the input down by 1/s)
before rounding shrinks their relative rounding error. For each group of
Linears sharing an input, s = mean|x|^a / mean|w|^(1-a) is searched over a
grid of a; 1/s is folded into the module producing that input (a norm or an
earlier Linear, see `calibrate.fold`), so nothing extra runs at inference.
Then a per-group clipping ratio of the weight range is searched.

Both searches minimise the layer-output error ||X dW^T||^2 = tr(dW H dW^T)
with H = X^T X from the calibration data, computed exactly from H instead of
re-running the layer (AWQ's code scores q/k/v on the attention output; here
each Linear's own output is the objective). With `quantize: false` the pass
only rescales and clips the float weights, so a following `gptq` step does the
rounding (AWQ scales first, then GPTQ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.fold import Fold, fold, scale_consumer
from calibrate.stats import ChannelStats, HessianCollector
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import check_fields
from compress.pipeline import PassReport, Progress
from compress.quantize.grid import fake_quantize, grouped, quantize_weight
from compress.quantize.qlinear import PendingSwaps
from compress.quantize.scheme import CalibratedQuantConfig, QuantScheme
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AWQConfig(CalibratedQuantConfig):
    n_grid: int = 20  # exponents a in {0, 1/n, ..., (n-1)/n} (paper: 20)
    duo_scaling: bool = True  # s = x^a / w^(1-a) (AutoAWQ); False: s = x^a (paper)
    clip: bool = True  # search a clipping ratio per (row, group)
    clip_grid: int = 20  # ratio steps of 1/clip_grid (paper code: 20)
    max_shrink: float = 0.5  # smallest ratio tried is 1 - max_shrink (paper code: 0.5)
    quantize: bool = True  # False: scale and clip the float weights only, for a following gptq step

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("n_grid", "clip_grid"), fraction=("max_shrink",))


def output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared output error of a weight change dW (out, in) under H (in, in)."""
    return float(((dW @ H) * dW).sum())


def search_scale(Ws: list[torch.Tensor], H: torch.Tensor, x_mean: torch.Tensor, scheme: QuantScheme, *,
                 n_grid: int = 20, duo_scaling: bool = True) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale s (in,) for Linears `Ws` (each (out_i, in)) that read the same input.

    Returns (s, error with s, error with s = 1); s = 1 is always a candidate,
    so the chosen error is never above plain round-to-nearest.
    """
    W = torch.cat([w.detach().float() for w in Ws])  # (sum out_i, in)
    x_mean = x_mean.float().clamp(min=1e-8)  # (in,)
    # mean normalised weight magnitude per input channel: |w| / max|w| of its group, averaged over rows
    Wg = grouped(W.abs(), scheme)  # (out, n_groups, g)
    w_mean = (Wg / Wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(W.shape[0], -1)[:, : W.shape[1]].mean(0)
    w_mean = w_mean.clamp(min=1e-8)

    def err(s: torch.Tensor) -> float:
        return output_error(fake_quantize(W * s, scheme) / s - W, H)

    base = err(torch.ones_like(x_mean))
    best_s, best = torch.ones_like(x_mean), base
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a) / w_mean.pow(1 - a) if duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (keeps fp16 scales in range)
        e = err(s)
        if e < best:
            best, best_s = e, s
    return best_s, best, base


def search_clip(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, *, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, float, float]:
    """W (out, in) with each (row, group) clipped to the ratio of its range that minimises its output error.

    The error of a group is scored with the group's diagonal block of H (the
    groups are chosen independently, as in AWQ's code). Returns (clipped W,
    error after, error before).
    """
    W = W.detach().float()
    out, n = W.shape
    g, ng = scheme.group_len(n), scheme.n_groups(n)
    Hp = torch.nn.functional.pad(H.float(), (0, ng * g - n, 0, ng * g - n))  # (ng*g, ng*g)
    Hb = torch.stack([Hp[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)])  # (ng, g, g)
    Wg = grouped(W, scheme)  # (out, ng, g)
    if scheme.symmetric:
        hi = Wg.abs().amax(-1, keepdim=True)  # (out, ng, 1)
        lo = -hi
    else:
        lo, hi = Wg.amin(-1, keepdim=True).clamp(max=0), Wg.amax(-1, keepdim=True).clamp(min=0)

    def group_err(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Wc = torch.maximum(torch.minimum(Wg, hi * ratio), lo * ratio)  # (out, ng, g)
        flat = Wc.reshape(out, -1)[:, :n]
        D = grouped(fake_quantize(flat, scheme) - W, scheme)  # (out, ng, g)
        return torch.einsum("okg,kgh,okh->ok", D, Hb, D), flat

    best_r = torch.ones(out, ng, 1)
    best, _ = group_err(best_r)
    before = float(best.sum())
    for i in range(1, int(max_shrink * grid) + 1):
        r = torch.full((out, ng, 1), 1 - i / grid)
        e, _ = group_err(r)
        better = e < best
        best = torch.where(better, e, best)
        best_r = torch.where(better[..., None], r, best_r)
    after, clipped = group_err(best_r)
    return clipped, float(after.sum()), before


@register_pass("awq", AWQConfig, needs_calibration=True, streams_blocks=True)
def run(model: nn.Module, cfg: AWQConfig, calib: torch.Tensor, *, progress: Progress | None = None) -> PassReport:
    """Scale, clip and (unless `quantize` is false) round the selected Linears block by block."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    totals = {"scale_before": 0.0, "scale_after": 0.0, "clip_before": 0.0, "clip_after": 0.0, "folded": 0,
              "bits": 0, "weights": 0}
    pending = PendingSwaps()

    def visit(block: Block) -> None:
        # statistics of every stage on the unmodified block, in one pass; AWQ changes the producers (norms)
        # too, so nothing of the block is reused between this pass and the one feeding the next block
        stats = block.observe(block.stages, lambda m: (HessianCollector(m.in_features, device=m.weight.device),
                                                       ChannelStats(m.in_features, device=m.weight.device)))
        producers = block.producers()
        hessians = {st[0]: _scale_stage(block, st, *stats.pop(st[0]), producers[st[0]], cfg, totals)
                    for st in block.stages}  # all scales are searched and folded before any weight is rounded
        for st in block.stages:
            H = hessians.pop(st[0])
            for n in st:
                _finish(n, block.modules[n], H, cfg, totals, pending)
                totals["weights"] += block.modules[n].weight.numel()

    def commit(module: nn.Module) -> None:
        totals["bits"] += pending.commit(module)

    walk(model, selected, calib, visit, label="awq", batch_size=cfg.batch_size, forward_dtype=cfg.forward_dtype,
         progress=progress, after=commit, min_expert_tokens=cfg.min_expert_tokens)
    log.info("awq: %d modules, %d scale folds", len(selected), totals["folded"])
    return _report(cfg, totals, len(selected))


def _report(cfg: AWQConfig, totals: dict, modules: int) -> PassReport:
    metrics = {"scale_error_ratio": totals["scale_after"] / max(totals["scale_before"], 1e-30),
               "clip_error_ratio": totals["clip_after"] / max(totals["clip_before"], 1e-30),
               "scaled_stages": totals["folded"]}
    if cfg.quantize:
        metrics["bits_per_weight"] = totals["bits"] / max(totals["weights"], 1)
    return PassReport(name="awq", modules=modules, metrics=metrics)


def _scale_stage(block: Block, stage: list[str], hc: HessianCollector, cs: ChannelStats, producer: Fold | None,
                 cfg: AWQConfig, totals: dict) -> torch.Tensor | None:
    """Search the stage's scale s and fold it (1/s into the producer, s into the stage's weights); return the
    Hessian of the stage's new input x / s (None when no calibration token reached the stage)."""
    H = hc.hessian if hc.tokens else None
    if H is None or producer is None:
        return H
    s, after, before = search_scale([block.modules[n].weight for n in stage], H, cs.mean_abs, cfg.scheme,
                                    n_grid=cfg.n_grid, duo_scaling=cfg.duo_scaling)
    fold(block.module, producer, s)
    for n in stage:
        scale_consumer(block.modules[n], s)
    totals["scale_before"] += before
    totals["scale_after"] += after
    totals["folded"] += 1
    return H.div_(s[:, None]).div_(s[None, :])  # the stage now reads x / s


@torch.no_grad()
def _finish(name: str, lin: nn.Linear, H: torch.Tensor | None, cfg: AWQConfig, totals: dict[str, float],
            pending: PendingSwaps) -> None:
    """Clip one (already scaled) Linear, then round it (a pending QuantLinear) or write the float weights back."""
    W = lin.weight.detach().float()
    if cfg.clip and H is not None:
        W, after, before = search_clip(W, H, cfg.scheme, grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
        totals["clip_before"] += before
        totals["clip_after"] += after
    if not cfg.quantize:
        lin.weight.copy_(W.to(lin.weight.dtype))
        return
    pending.add(name, lin, *quantize_weight(W, cfg.scheme), cfg.scheme)
