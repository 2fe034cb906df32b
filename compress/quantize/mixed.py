"""Mixed precision: bits per layer chosen from measured sensitivity to meet an average bit budget.

Layers differ in how much their outputs suffer from coarse grids (HAWQ-V3,
Yao et al. 2021, https://arxiv.org/abs/2011.10680, allocates bits by a
sensitivity-weighted knapsack). Here the sensitivity of a Linear at b bits is
its measured GPTQ layer-output error tr(dW H dW^T) on the calibration data
(H = X^T X of its inputs in the float model), and the cost is the exact number
of bits its packed codes, scales and zero points take on disk. A Lagrangian
relaxation of the multiple-choice knapsack (minimise summed error subject to
the bit budget), refined greedily with any budget left, picks one width per
layer; then GPTQ quantizes every layer at its width, block by block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.stats import HessianCollector
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import check_fields
from compress.pipeline import PassReport, Progress
from compress.prune.sparsity import pruned_modules
from compress.quantize.awq import output_error
from compress.quantize.gptq import GPTQConfig, quantize_blocks, quantize_weight
from compress.quantize.grid import dequantize
from compress.quantize.packing import packed_len
from compress.quantize.scheme import SUPPORTED_BITS, QuantScheme
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MixedConfig(GPTQConfig):
    """GPTQ with per-layer bits; the inherited `bits` is not used (each layer gets its own)."""

    target_bits: float = 4.25  # average stored bits per weight of the selected Linears, scales included
    candidates: tuple[int, ...] = (2, 3, 4, 8)  # bit widths a layer may get

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [b for b in self.candidates if b not in SUPPORTED_BITS]
        if not self.candidates or bad:
            raise ValueError(f"candidates must be a non-empty subset of {SUPPORTED_BITS}, got {self.candidates}")
        check_fields(self, positive=("target_bits",))

    def check_model(self, model: nn.Module) -> None:
        """Before any work: the group size fits, and `target_bits` lies between the smallest and the largest
        average size the candidates can give (a target above the largest would silently give the largest)."""
        super().check_model(model)
        shapes = [(m.out_features, m.in_features)
                  for m in tg.select(model, self.targets, self.ignore, kinds=(nn.Linear,)).values()]
        n = sum(o * i for o, i in shapes)
        if not n:
            return
        sizes = {b: sum(storage_bits(o, i, _scheme(self, b)) for o, i in shapes) / n for b in self.candidates}
        lo, hi = min(sizes.values()), max(sizes.values())
        if not lo <= self.target_bits <= hi:
            raise ValueError(f"target_bits {self.target_bits:g} is outside what the candidates {list(self.candidates)} "
                             f"can give this model: {lo:.3f} (all at {min(sizes, key=sizes.get)} bits) to {hi:.3f} "
                             f"(all at {max(sizes, key=sizes.get)} bits), scales and zero points included")


def storage_bits(out: int, n_in: int, scheme: QuantScheme) -> int:
    """Bits on disk of one packed (out, in) weight: codes, scales, and zero points when asymmetric."""
    ng = scheme.stored(n_in).n_groups(n_in)
    bits = out * packed_len(n_in, scheme.bits) * 32 + out * ng * scheme.torch_scale_dtype.itemsize * 8
    if not scheme.symmetric:
        bits += packed_len(out, scheme.bits) * ng * 32
    return bits


def allocate(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, int]], budget: float) -> dict[str, int]:
    """One bit width per layer minimising the summed error with summed cost <= budget.

    Lagrangian relaxation: for a multiplier lam every layer takes
    argmin_b err + lam * cost; bisection finds the smallest lam within budget,
    then the leftover budget buys the upgrades with the best error saved per bit.
    """
    names = list(errors)

    def pick(lam: float) -> dict[str, int]:
        return {n: min(errors[n], key=lambda b, n=n: (errors[n][b] + lam * costs[n][b], costs[n][b])) for n in names}

    def total(choice: dict[str, int]) -> float:
        return sum(costs[n][b] for n, b in choice.items())

    cheapest = {n: min(costs[n], key=costs[n].get) for n in names}
    if total(cheapest) > budget:
        raise ValueError(f"the bit budget is below the smallest possible size ({total(cheapest):.0f} bits "
                         f"> {budget:.0f}); raise target_bits or add smaller candidates")
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(pick(mid)) > budget else (lo, mid)
    choice = pick(hi)
    left = budget - total(choice)
    while True:  # greedy refinement with what the relaxation left unused
        best, gain = None, 0.0
        for n in names:
            for b in errors[n]:
                extra = costs[n][b] - costs[n][choice[n]]
                saved = errors[n][choice[n]] - errors[n][b]
                if 0 < extra <= left and saved > 0 and saved / extra > gain:
                    best, gain = (n, b, extra), saved / extra
        if best is None:
            return choice
        choice[best[0]] = best[1]
        left -= best[2]


@torch.no_grad()
def measure_sensitivity(model: nn.Module, cfg: MixedConfig, calib: torch.Tensor,
                        progress: Progress | None = None) -> dict[str, dict[int, float]]:
    """name -> {bits: GPTQ layer-output error} for every selected Linear, on the float model's inputs."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    errors: dict[str, dict[int, float]] = {}
    sparse = pruned_modules(model)

    def visit(block: Block) -> None:
        hs = block.observe(block.stages, HessianCollector.of)
        for st in block.stages:
            H = hs.pop(st[0])[0].hessian
            for n in st:
                W = block.modules[n].weight.detach().float()
                keep = (W == 0) if block.name(n) in sparse else None  # pruned zeros stay, as in GPTQ
                errors[block.name(n)] = {
                    bits: output_error(dequantize(*quantize_weight(W, H, s, block_size=cfg.block_size,
                                                                   dampening=cfg.dampening, act_order=cfg.act_order,
                                                                   zeros=keep)[:3], s) - W, H)
                    for bits in cfg.candidates for s in [_scheme(cfg, bits)]}

    walk(model, selected, calib, visit, label="mixed: sensitivity", batch_size=cfg.batch_size,
         forward_dtype=cfg.forward_dtype, progress=progress, min_expert_tokens=cfg.min_expert_tokens)
    return errors


def _scheme(cfg: MixedConfig, bits: int) -> QuantScheme:
    return QuantScheme(bits=bits, group_size=cfg.group_size, symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype)


@register_pass("mixed", MixedConfig, needs_calibration=True, streams_blocks=True)
def run(model: nn.Module, cfg: MixedConfig, calib: torch.Tensor, *, progress: Progress | None = None) -> PassReport:
    """Measure each layer's error per bit width, allocate bits under `target_bits`, then GPTQ at those bits."""
    shapes = {n: (m.out_features, m.in_features)
              for n, m in tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,)).items()}
    errors = measure_sensitivity(model, cfg, calib, progress)
    costs = {n: {b: storage_bits(*shapes[n], _scheme(cfg, b)) for b in cfg.candidates} for n in errors}
    n_weights = sum(o * i for o, i in shapes.values())
    choice = allocate(errors, costs, cfg.target_bits * n_weights)
    log.info("mixed: bits per layer %s", choice)
    done, loss, bits, weights = quantize_blocks(model, cfg, calib, lambda name: _scheme(cfg, choice[name]),
                                                label="mixed", progress=progress)
    counts = {b: sum(1 for v in choice.values() if v == b) for b in cfg.candidates}
    return PassReport(name="mixed", config={"bits_per_module": choice}, modules=done, metrics={
        "bits_per_weight": bits / max(weights, 1), "gptq_loss": loss,
        "predicted_error": sum(errors[n][b] for n, b in choice.items()),
        **{f"layers_at_{b}_bits": c for b, c in counts.items()}})
