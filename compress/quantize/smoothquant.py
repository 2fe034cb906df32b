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

With `search`, a is chosen per block from `alpha_grid` as the one whose
block output under simulated W8A8 (per-channel weights, per-tensor min/max
activations) is closest to the float block's; the paper tunes one a per
model by hand. The pass changes float weights only: a `w8a8` step follows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import (
    BlockInputs,
    blocks_in_turn,
    capture_first_block_inputs,
    check_forward_options,
    input_stages,
    modules_by_block,
    observe_stages,
    resolve_forward_dtype,
    run_block,
)
from calibrate.fold import find_producers, fold_into_producer, scale_consumer
from calibrate.stats import ChannelStats
from compress import targets as tg
from compress.pipeline import PassReport, Progress
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength: 0 leaves activations alone, 1 moves all of their range into W
    search: bool = False  # choose alpha per block from alpha_grid on the block's simulated W8A8 output error
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    targets: tuple[str, ...] = tg.DEFAULT_TARGETS
    ignore: tuple[str, ...] = tg.DEFAULT_IGNORE
    batch_size: int = 8  # calibration samples per forward pass
    forward_dtype: str = "auto"  # calibration forwards: "auto" = bfloat16 where the device has fast bf16

    def __post_init__(self) -> None:
        for a in (self.alpha, *self.alpha_grid):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha values must lie in [0, 1], got {a}")
        if self.search and not self.alpha_grid:
            raise ValueError("search needs a non-empty alpha_grid")
        tg.validate_patterns(self.targets, "targets")
        tg.validate_patterns(self.ignore, "ignore")
        check_forward_options(self.batch_size, self.forward_dtype)


def smoothing_factors(x_max: torch.Tensor, Ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) = max|X_j|^alpha / max|W_j|^(1 - alpha) for Linears `Ws` (each (out_i, in)) sharing input X."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in Ws]).amax(0)  # (in,)
    s = x_max.float().clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    # a channel that never fired (x_max 0) keeps s = 1: there is nothing to migrate
    return torch.where(x_max > 0, s, torch.ones_like(s)).clamp(1e-4, 1e4)


@torch.no_grad()
def _fake_w8a8_error(block: nn.Module, inputs: BlockInputs, mods: dict[str, nn.Module],
                     reference: list[torch.Tensor], dtype) -> float:
    """Squared error of the block's outputs with its `mods` simulated as W8A8 (weights restored after)."""
    saved = {n: m.weight.detach().clone() for n, m in mods.items()}
    for m in mods.values():
        W = m.weight.float()
        scale = (W.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (out, 1)
        m.weight.copy_((torch.round(W / scale).clamp(-127, 127) * scale).to(m.weight.dtype))

    def fake_act(mod, args):  # per-tensor asymmetric min/max of this batch, int8
        x = args[0]
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        s = ((hi - lo) / 255).clamp_min(1e-12)
        z = torch.round(-128 - lo / s)
        return ((torch.round(x / s) + z).clamp(-128, 127) - z) * s, *args[1:]

    handles = [m.register_forward_pre_hook(fake_act) for m in mods.values()]
    err = 0.0
    try:
        out = BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs)
        run_block(block, out, dtype=dtype)
        err = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(out.hidden, reference, strict=True))
    finally:
        for h in handles:
            h.remove()
        for n, m in mods.items():
            m.weight.copy_(saved[n])
    return err


@register_pass("smoothquant", SmoothQuantConfig, needs_calibration=True, streams_blocks=True)
def run(model: nn.Module, cfg: SmoothQuantConfig, calib: torch.Tensor, *,
        progress: Progress | None = None) -> PassReport:
    """Fold SmoothQuant factors into every stage of selected Linears whose input has a foldable producer."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    _, blocks, per_block = modules_by_block(model, selected, "smoothquant")
    inputs = capture_first_block_inputs(model, calib, batch_size=cfg.batch_size)
    dtype = resolve_forward_dtype(cfg.forward_dtype, next(iter(selected.values())).weight)
    producers_of: dict[tuple, dict[str, str | None]] = {}
    smoothed = skipped = 0
    chosen: list[float] = []
    outlier_before = outlier_after = 0.0
    for b, block in blocks_in_turn(model, blocks):
        mods = per_block[b]
        if mods:
            stages = input_stages(block, inputs, mods)
            stats = observe_stages(block, inputs, stages, mods,
                                   lambda m: (ChannelStats(m.in_features, device=m.weight.device),), dtype=dtype)
            kind = (type(block), tuple(map(tuple, stages)))
            if kind not in producers_of:
                producers_of[kind] = find_producers(block, inputs, stages, mods)
            plan = [(st, block.get_submodule(producers_of[kind][st[0]]), stats[st[0]][0].max_abs)
                    for st in stages if producers_of[kind][st[0]] is not None and stats[st[0]][0].tokens]
            skipped += len(stages) - len(plan)
            alpha = cfg.alpha
            if cfg.search and plan:
                alpha = _search_alpha(block, inputs, mods, plan, cfg, dtype)
            for st, producer, x_max in plan:
                s = smoothing_factors(x_max, [mods[n].weight for n in st], alpha)
                fold_into_producer(producer, s)
                for n in st:
                    scale_consumer(mods[n], s)
                # how far the largest channel stands out from the typical one, before and after
                outlier_before += float(x_max.max() / x_max.median().clamp_min(1e-8))
                after = x_max / s
                outlier_after += float(after.max() / after.median().clamp_min(1e-8))
                smoothed += 1
            chosen.append(alpha)
        run_block(block, inputs, dtype=dtype)
        if progress:
            progress("smoothquant", b + 1, len(blocks))
    log.info("smoothquant: %d stages smoothed, %d without a foldable producer", smoothed, skipped)
    return PassReport(
        name="smoothquant",
        config={"alpha": cfg.alpha, "search": cfg.search, "alpha_grid": list(cfg.alpha_grid),
                "targets": list(cfg.targets), "ignore": list(cfg.ignore), "forward_dtype": cfg.forward_dtype,
                "calibration_tokens": int(calib.numel())},
        modules=sum(len(m) for m in per_block),
        metrics={"smoothed_stages": smoothed, "stages_without_producer": skipped,
                 "mean_alpha": sum(chosen) / max(len(chosen), 1),
                 "outlier_ratio_before": outlier_before / max(smoothed, 1),
                 "outlier_ratio_after": outlier_after / max(smoothed, 1)},
    )


@torch.no_grad()
def _search_alpha(block: nn.Module, inputs: BlockInputs, mods: dict[str, nn.Module], plan, cfg: SmoothQuantConfig,
                  dtype) -> float:
    """The alpha of `alpha_grid` with the least simulated-W8A8 block output error (the block is left unchanged)."""
    reference = BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs)
    run_block(block, reference, dtype=dtype)
    saved = {k: v.detach().clone() for k, v in block.state_dict().items()}
    best, best_err = cfg.alpha_grid[0], float("inf")
    for alpha in cfg.alpha_grid:
        for st, producer, x_max in plan:
            s = smoothing_factors(x_max, [mods[n].weight for n in st], alpha)
            fold_into_producer(producer, s)
            for n in st:
                scale_consumer(mods[n], s)
        err = _fake_w8a8_error(block, inputs, mods, reference.hidden, dtype)
        block.load_state_dict(saved)
        if err < best_err:
            best, best_err = alpha, err
    log.debug("smoothquant: block alpha %.2f (error %.4g)", best, best_err)
    return best
