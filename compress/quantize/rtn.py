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

from calibrate.blocks import modules_in_turn
from compress import targets as tg
from compress.checks import about
from compress.pipeline import PassReport, Progress
from compress.quantize.grid import dequantize, quantize_weight
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import WeightQuantConfig
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest: the shared weight scheme and module selection, nothing else."""


@torch.no_grad()
def _quantize_one(model: nn.Module, name: str, lin: nn.Linear, scheme) -> tuple[int, float, float]:
    """Swap in the QuantLinear of `lin`; return (storage bits, squared weight error, squared weight norm)."""
    W = lin.weight.detach().float()  # (out, in)
    with about(name):
        q, scale, zero = quantize_weight(W, scheme)
        qlin = QuantLinear.from_codes(q, scale, zero, scheme, bias=lin.bias, dtype=lin.weight.dtype)
    err = float((dequantize(q, scale, zero, scheme) - W).pow(2).sum())
    tg.set_submodule(model, name, qlin)
    ref = float(W.pow(2).sum())
    lin.to("meta")  # free the float weight now: the selection dict still holds the old module
    return qlin.storage_bits(), err, ref


@register_pass("rtn", RTNConfig, streams_blocks=True)
def run(model: nn.Module, cfg: RTNConfig, calib=None, *, progress: Progress | None = None) -> PassReport:
    """Replace every selected Linear by a QuantLinear holding its round-to-nearest codes."""
    modules = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    scheme = cfg.scheme
    err_sum = ref_sum = 0.0
    bits = weights = 0
    # a lazily loaded model: one block in memory at a time
    for done, (name, lin) in enumerate(modules_in_turn(model, modules), 1):
        bits_n, err, ref = _quantize_one(model, name, lin, scheme)
        bits += bits_n
        err_sum += err
        ref_sum += ref
        weights += lin.in_features * lin.out_features
        if progress:
            progress("rtn", done, len(modules))
    log.info("rtn: quantized %d modules to %d bits", len(modules), cfg.bits)
    return PassReport(name="rtn", modules=len(modules), metrics={
        "relative_weight_error": (err_sum / ref_sum) ** 0.5 if ref_sum else 0.0, "bits_per_weight": bits / weights})
