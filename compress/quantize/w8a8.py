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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from calibrate.blocks import batches, modules_in_turn
from calibrate.forward import ForwardOptions
from calibrate.observers import OBSERVERS, SYMMETRIC_ONLY, make_observer
from calibrate.walk import Block, walk
from compress import targets as tg
from compress.checks import check_fields
from compress.pipeline import PassReport, Progress
from compress.quantize.smoothquant import TokenSample
from compress.quantize.w8a8linear import ACTIVATIONS, W8A8Linear
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class W8A8Config(ForwardOptions, tg.Selection):
    activations: str = "static"  # static: calibrated per-tensor grid; dynamic: per-token scales at run time
    observer: str = "minmax"  # static range: minmax | percentile | mse | kl
    percentile: float = 99.99  # the percentile observer's coverage
    symmetric_activations: bool = False  # False: a zero point fits one-sided ranges (SiLU outputs) better
    fallback_error: float | None = None  # static: a stage whose relative output error exceeds this stays float
    error_tokens: int = 4096  # input rows per stage its output error is measured on

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("fallback_error", "error_tokens"),
                     choices={"activations": ACTIVATIONS, "observer": OBSERVERS})
        if self.fallback_error is not None and self.activations != "static":
            raise ValueError("fallback_error needs static activations (it is decided on calibration data)")
        if self.observer in SYMMETRIC_ONLY and not self.symmetric_activations:
            raise ValueError(f"the {self.observer} observer is symmetric only (TensorRT's entropy calibration): "
                             f"set symmetric_activations: true (`--observer {self.observer}` does)")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def new_observer(self):
        kw = {"percentile": self.percentile} if self.observer == "percentile" else {}
        return make_observer(self.observer, symmetric=self.symmetric_activations, **kw)


@register_pass("w8a8", W8A8Config, needs_calibration=lambda cfg, model: cfg.activations == "static",
               streams_blocks=True)
def run(model: nn.Module, cfg: W8A8Config, calib: torch.Tensor | None = None, *,
        progress: Progress | None = None) -> PassReport:
    """Replace every selected Linear by a W8A8Linear (static: with calibrated activation grids)."""
    selected = tg.select(model, cfg.targets, cfg.ignore, kinds=(nn.Linear,))
    tally = _Tally(cfg)
    if cfg.activations == "dynamic":
        for i, (name, lin) in enumerate(modules_in_turn(model, selected)):
            tally.swap(model, name, lin)
            if progress:
                progress("w8a8", i + 1, len(selected))
        return tally.report(len(selected))
    per_batch = max(1, cfg.error_tokens // batches(calib, cfg.batch_size))

    def visit(block: Block) -> None:
        # one stage at a time: its input already passes through the quantized stages before it
        for stage, (observer, sample) in block.stagewise(lambda m: (cfg.new_observer(), TokenSample(per_batch))):
            tally.static_stage(block, stage, observer, sample)

    walk(model, selected, calib, visit, label="w8a8", batch_size=cfg.batch_size, forward_dtype=cfg.forward_dtype,
         progress=progress, min_expert_tokens=cfg.min_expert_tokens)
    return tally.report(len(selected))


@dataclass
class _Tally:
    """The swaps of one run and what its report says of them."""

    cfg: W8A8Config
    weight_err: float = 0.0
    weight_ref: float = 0.0
    bits: int = 0
    weights: int = 0
    ranges: list[float] = field(default_factory=list)  # activation range of every static grid
    errors: dict[str, float] = field(default_factory=dict)  # stage (its first module's full name) -> output error
    fallback: list[str] = field(default_factory=list)  # modules left in float

    def swap(self, parent: nn.Module, name: str, lin: nn.Linear, scale=None, zero=None) -> None:
        q = W8A8Linear.from_linear(lin, activations=self.cfg.activations, input_scale=scale, input_zero_point=zero)
        W = lin.weight.detach().float()
        self.weight_err += float((q.dequantize_weight() - W).pow(2).sum())
        self.weight_ref += float(W.pow(2).sum())
        self.bits += q.storage_bits()
        self.weights += W.numel()
        tg.set_submodule(parent, name, q)
        lin.to("meta")  # free the float weight now: the selection dict still holds the old module

    def static_stage(self, block: Block, stage: list[str], observer, sample: TokenSample) -> None:
        """Swap a stage's Linears onto the grid its observer chose, unless its output error is above fallback."""
        cfg = self.cfg
        if observer.batches == 0:
            raise ValueError(f"w8a8: {', '.join(map(block.name, stage))} never ran on the calibration data; "
                             "add them to ignore")
        scale, zero = observer.qparams()
        lo, hi = observer.range()
        err = stage_error(sample.tokens, [block.modules[n] for n in stage], cfg.activations, scale, zero)
        self.errors[block.name(stage[0])] = err
        if cfg.fallback_error is not None and err > cfg.fallback_error:
            self.fallback.extend(map(block.name, stage))
            log.info("w8a8: %s stays float (relative output error %.4g > %.4g)", ", ".join(stage), err,
                     cfg.fallback_error)
            return
        self.ranges.append(float(hi - lo))
        for n in stage:
            self.swap(block.module, n, block.modules[n], scale, zero)

    def report(self, selected: int) -> PassReport:
        cfg, errors = self.cfg, self.errors
        log.info("w8a8: %d modules, %s activations", selected - len(self.fallback), cfg.activations)
        metrics = {"relative_weight_error": (self.weight_err / self.weight_ref) ** 0.5 if self.weight_ref else 0.0,
                   "bits_per_weight": self.bits / max(self.weights, 1)}
        if self.ranges:
            metrics["activation_grids"] = len(self.ranges)
            metrics["mean_activation_range"] = sum(self.ranges) / len(self.ranges)
        if errors:
            metrics["mean_stage_error"] = sum(errors.values()) / len(errors)
            metrics["max_stage_error"] = errors[max(errors, key=errors.get)]
            metrics["float_fallback_modules"] = len(self.fallback)
        config: dict[str, Any] = {"observer": cfg.observer if cfg.activations == "static" else None}
        if errors:
            config["stage_errors"] = dict(errors)
            config["float_fallback"] = self.fallback
        return PassReport(name="w8a8", config=config, modules=selected - len(self.fallback), metrics=metrics)


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


def w8a8_recipe(*, activations: str = "static", observer: str = "minmax", smoothquant: float | str | None = None,
                ignore: list[str] | None = None, **fields: Any) -> list[dict[str, Any]]:
    """The recipe steps of W8A8 (`compress quantize --bits 8 --activations int8`): optional SmoothQuant, then
    the `w8a8` pass.

    `smoothquant` is an alpha in [0, 1], "search" (alpha chosen per block), or None (no smoothing).
    """
    sel = {"ignore": ignore} if ignore else {}
    if observer in SYMMETRIC_ONLY:  # TensorRT's entropy calibration is defined for a symmetric grid
        fields.setdefault("symmetric_activations", True)
    steps: list[dict[str, Any]] = []
    if smoothquant is not None:
        sq = {"search": True, "search_observer": observer} if smoothquant == "search" else {"alpha": float(smoothquant)}
        steps.append({"pass": "smoothquant", **sq, **sel})
    steps.append({"pass": "w8a8", "activations": activations, "observer": observer, **sel, **fields})
    return steps
