"""W8A8: int8 weights and int8 activations, with activation ranges from calibration observers.

Weights are rounded per output channel (symmetric, scale max|w| / 127: at 8
bits round-to-nearest loses little). Activations take one scale (and zero
point) per tensor, fixed from calibration ("static", Jacob et al., CVPR 2018,
https://arxiv.org/abs/1712.05877), chosen by an observer (`calibrate.observers`:
min/max, percentile, MSE-optimal or KL clipping); or a scale per token computed
at run time ("dynamic", no calibration). Calibration is sequential: each
block's stages are observed on the outputs of the already-quantized blocks
and stages before them, so each range sees the error upstream. Modules that
share an input share its observer, hence one activation grid, and ONNX
quantizes that input once. Pair with `smoothquant` first (the preset CLI
chain `--smoothquant A`) to tame activation outliers.

Every static stage is scored on a sample of its calibration input: the
relative squared error ||Y_int8 - Y||^2 / ||Y||^2 of the quantized modules'
exact integer outputs against the float ones. With `fallback_error`, a stage
above it stays in float (mixed precision, as NNCF's and Neural Compressor's
accuracy-aware modes keep their most sensitive layers); the report lists the
stages' errors and the modules left in float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import (
    blocks_in_turn,
    capture_first_block_inputs,
    check_forward_options,
    input_stages,
    modules_by_block,
    modules_in_turn,
    observe_stages,
    resolve_forward_dtype,
    run_block,
)
from calibrate.observers import OBSERVERS, SYMMETRIC_ONLY, make_observer
from compress import targets as tg
from compress.pipeline import PassReport, Progress
from compress.quantize.smoothquant import TokenSample
from compress.quantize.w8a8linear import ACTIVATIONS, W8A8Linear
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class W8A8Config:
    activations: str = "static"  # static: calibrated per-tensor grid; dynamic: per-token scales at run time
    observer: str = "minmax"  # static range: minmax | percentile | mse | kl
    percentile: float = 99.99  # the percentile observer's coverage
    symmetric_activations: bool = False  # False: a zero point fits one-sided ranges (SiLU outputs) better
    targets: tuple[str, ...] = tg.DEFAULT_TARGETS
    ignore: tuple[str, ...] = tg.DEFAULT_IGNORE  # lm_head stays float by default
    batch_size: int = 8  # calibration samples per forward pass
    forward_dtype: str = "auto"  # calibration forwards: "auto" = bfloat16 where the device has fast bf16
    fallback_error: float | None = None  # static: a stage whose relative output error exceeds this stays float
    error_tokens: int = 4096  # input rows per stage its output error is measured on

    def __post_init__(self) -> None:
        if self.fallback_error is not None and not self.fallback_error > 0:
            raise ValueError(f"fallback_error must be positive, got {self.fallback_error}")
        if self.fallback_error is not None and self.activations != "static":
            raise ValueError("fallback_error needs static activations (it is decided on calibration data)")
        if self.error_tokens < 1:
            raise ValueError(f"error_tokens must be positive, got {self.error_tokens}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        if self.observer in SYMMETRIC_ONLY and not self.symmetric_activations:
            raise ValueError(f"the {self.observer} observer is symmetric only (TensorRT's entropy calibration): "
                             f"set symmetric_activations: true (`--observer {self.observer}` does)")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        tg.validate_patterns(self.targets, "targets")
        tg.validate_patterns(self.ignore, "ignore")
        check_forward_options(self.batch_size, self.forward_dtype)

    def new_observer(self):
        kw = {"percentile": self.percentile} if self.observer == "percentile" else {}
        return make_observer(self.observer, symmetric=self.symmetric_activations, **kw)


def _calibrates(cfg: W8A8Config, model) -> bool:
    return cfg.activations == "static"


@register_pass("w8a8", W8A8Config, needs_calibration=_calibrates, streams_blocks=True)
def run(model: nn.Module, cfg: W8A8Config, calib: torch.Tensor | None = None, *,
        progress: Progress | None = None) -> PassReport:
    """Replace every selected Linear by a W8A8Linear (static: with calibrated activation grids)."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    if not selected:
        raise ValueError("w8a8: no Linear matches the targets/ignore selection")
    weight_err = weight_ref = 0.0
    bits = weights = 0

    def swap(parent: nn.Module, name: str, lin: nn.Linear, scale=None, zero=None) -> None:
        nonlocal weight_err, weight_ref, bits, weights
        q = W8A8Linear.from_linear(lin, activations=cfg.activations, input_scale=scale, input_zero_point=zero)
        W = lin.weight.detach().float()
        weight_err += float((q.dequantize_weight() - W).pow(2).sum())
        weight_ref += float(W.pow(2).sum())
        bits += q.storage_bits()
        weights += W.numel()
        tg.set_submodule(parent, name, q)
        lin.to("meta")  # free the float weight now: the selection dict still holds the old module

    ranges: list[float] = []
    errors: dict[str, float] = {}  # stage (its first module's full name) -> relative output error
    fallback: list[str] = []
    if cfg.activations == "dynamic":
        done = 0
        for batch in modules_in_turn(model, selected):
            for name, lin in batch:
                swap(model, name, lin)
                done += 1
                if progress:
                    progress("w8a8", done, len(selected))
    else:
        if calib is None:
            raise ValueError("w8a8 with static activations needs calibration data")
        _, blocks, per_block = modules_by_block(model, selected, "w8a8")
        inputs = capture_first_block_inputs(model, calib, batch_size=cfg.batch_size)
        dtype = resolve_forward_dtype(cfg.forward_dtype, next(iter(selected.values())).weight)
        full = {id(m): n for n, m in selected.items()}
        per_batch = max(1, cfg.error_tokens // max(len(inputs.hidden), 1))
        for b, block in blocks_in_turn(model, blocks):
            mods = per_block[b]
            for stage in (input_stages(block, inputs, mods) if mods else []):
                # one stage at a time: its input already passes through the quantized stages before it
                obs, sample = observe_stages(block, inputs, [stage], mods,
                                             lambda m: (cfg.new_observer(), TokenSample(per_batch)),
                                             dtype=dtype)[stage[0]]
                if obs.batches == 0:
                    raise ValueError(f"w8a8: block {b} {', '.join(stage)} never ran on the calibration data; "
                                     "add them to ignore")
                scale, zero = obs.qparams()
                lo, hi = obs.range()
                err = stage_error(sample.tokens, [mods[n] for n in stage], cfg.activations, scale, zero)
                errors[full[id(mods[stage[0]])]] = err
                if cfg.fallback_error is not None and err > cfg.fallback_error:
                    fallback.extend(full[id(mods[n])] for n in stage)
                    log.info("w8a8: %s stays float (relative output error %.4g > %.4g)",
                             ", ".join(stage), err, cfg.fallback_error)
                    continue
                ranges.append(float(hi - lo))
                for n in stage:
                    swap(block, n, mods[n], scale, zero)
            run_block(block, inputs, dtype=dtype)
            if progress:
                progress("w8a8", b + 1, len(blocks))
    log.info("w8a8: %d modules, %s activations", len(selected) - len(fallback), cfg.activations)
    metrics = {"relative_weight_error": (weight_err / weight_ref) ** 0.5 if weight_ref else 0.0,
               "bits_per_weight": bits / max(weights, 1)}
    if ranges:
        metrics["activation_grids"] = len(ranges)
        metrics["mean_activation_range"] = sum(ranges) / len(ranges)
    if errors:
        metrics["mean_stage_error"] = sum(errors.values()) / len(errors)
        worst = max(errors, key=errors.get)
        metrics["max_stage_error"] = errors[worst]
        metrics["float_fallback_modules"] = len(fallback)
    config = {"activations": cfg.activations, "observer": cfg.observer if cfg.activations == "static" else None,
              "symmetric_activations": cfg.symmetric_activations, "targets": list(cfg.targets),
              "ignore": list(cfg.ignore), "forward_dtype": cfg.forward_dtype,
              "fallback_error": cfg.fallback_error}
    if errors:
        config["stage_errors"] = dict(errors)
        config["float_fallback"] = fallback
    if cfg.observer == "percentile":
        config["percentile"] = cfg.percentile
    if calib is not None:
        config["calibration_tokens"] = int(calib.numel())
    return PassReport(name="w8a8", config=config, modules=len(selected) - len(fallback), metrics=metrics)


@torch.no_grad()
def stage_error(x: torch.Tensor, lins: list[nn.Linear], activations: str, scale=None, zero=None) -> float:
    """||Y_q - Y||^2 / ||Y||^2 over a stage's Linears on input rows x (tokens, in): Y_q from the W8A8Linears they
    would become (exact integer products), Y from the float modules."""
    err = ref = 0.0
    for lin in lins:
        q = W8A8Linear.from_linear(lin, activations=activations, input_scale=scale, input_zero_point=zero)
        xf = x.to(lin.weight.dtype)
        y = lin(xf).float()
        err += float((q(xf).float() - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)
