"""Round-to-nearest (RTN) weight-only quantization, the data-free baseline.

Each weight group gets a scale (and, asymmetric, an integer zero point) from
its own range, and every weight is rounded to the nearest grid point. No
calibration data: it is the reference point that calibrated methods (GPTQ,
Frantar et al. 2023, https://arxiv.org/abs/2210.17323; AWQ, Lin et al. 2024)
are measured against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compress import targets as tg
from compress.pipeline import PassReport, Progress
from compress.quantize.grid import dequantize, quantize_weight
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import WeightQuantConfig
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest: the shared weight scheme and module selection, nothing else."""


@register_pass("rtn", RTNConfig)
def run(model: nn.Module, cfg: RTNConfig, calib=None, *, progress: Progress | None = None) -> PassReport:
    """Replace every selected Linear by a QuantLinear holding its round-to-nearest codes."""
    modules = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    scheme = cfg.scheme
    err_sum = ref_sum = 0.0
    bits = weights = 0
    for i, (name, lin) in enumerate(modules.items()):
        with torch.no_grad():
            W = lin.weight.detach().float()  # (out, in)
            q, scale, zero = quantize_weight(W, scheme)
            err_sum += float((dequantize(q, scale, zero, scheme) - W).pow(2).sum())
            ref_sum += float(W.pow(2).sum())
            qlin = QuantLinear.from_codes(q, scale, zero, scheme, bias=lin.bias, dtype=lin.weight.dtype)
        tg.set_submodule(model, name, qlin)
        bits += qlin.storage_bits()
        weights += W.numel()
        if progress:
            progress("rtn", i + 1, len(modules))
    log.info("rtn: quantized %d modules to %d bits", len(modules), cfg.bits)
    return PassReport(
        name="rtn",
        config={**scheme.to_dict(), "targets": list(cfg.targets), "ignore": list(cfg.ignore)},
        modules=len(modules),
        metrics={
            "relative_weight_error": (err_sum / ref_sum) ** 0.5 if ref_sum else 0.0,
            "bits_per_weight": bits / weights,
        },
    )
