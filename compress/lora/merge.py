"""LoRA merging: fold PEFT adapters into the base weights, also into a quantized base.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021,
https://arxiv.org/abs/2106.09685 (merge math and DoRA / TIES in `combine`).
Every adapted Linear gets W' = W + delta. A quantized base (a compress
artifact: QuantLinear modules) is dequantized where an adapter touches it,
merged in float32, and re-quantized with the method its recipe recorded
(GPTQ with fresh calibration for gptq/mixed artifacts; round-to-nearest with the
module's own scheme otherwise, since AWQ's scales are already folded into the
weights), so the result is again a packed artifact; the report gives the
relative weight error that re-quantization adds to the float merge.

Re-quantization always rounds onto fresh grids, by running the recorded
quantizer step on the merged modules. Earlier versions could also keep the
artifact's grids (scales and zero points), pick per module whichever of the
two reconstructed the layer better, and weight GPTQ's loss along the delta's
input directions; measured on the reference model (bench/lora_merge_reference.py,
a 16-step LoRA into a GPTQ W4 g128 artifact) they scored 27.00-27.97 against
26.75 with fresh grids (the kept grid rounds away deltas under half a step, an
error that adds up over the layers), so they were removed.

Re-quantizing adds a second rounding error on top of the base's; a following
`scale_tune` step (`compress.distill.scale_tune`; `compress merge-lora` adds
one for a quantized base) refits the re-quantized modules' scales so that the
model's output distribution matches the exact float merge. Measured on the
reference model it halves that KL (0.059 -> 0.029) and takes the merge from
26.75 to 26.11, -0.10 % against merge-then-quantize (26.14;
bench/results/README.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compress.lora.adapter import (
    check_against,
    check_combination,
    drop_sparsity_record,
    read_adapter,
    replace_tensor,
)
from compress.lora.combine import COMBINATIONS, combine, dora_weight
from compress.pipeline import PassReport, Progress, recipe_history
from compress.quantize.qlinear import QuantLinear
from compress.registry import register_pass
from compress.targets import set_submodule

log = logging.getLogger(__name__)

REQUANTIZE = ("recorded", "gptq", "rtn")
_GPTQ_FIELDS = ("batch_size", "forward_dtype", "block_size", "dampening", "act_order", "true_sequential")


@dataclass(frozen=True, kw_only=True)
class LoraMergeConfig:
    adapters: tuple[str, ...] = ()  # PEFT adapter directories
    weights: tuple[float, ...] = ()  # one per adapter, scaling its delta; default 1 each
    method: Literal[COMBINATIONS] = "linear"  # several adapters: "linear" (weighted sum of deltas) or "ties"
    density: float = 0.2  # ties: fraction of each delta's entries kept (the paper's top 20 %)
    requantize: Literal[REQUANTIZE] = "recorded"  # quantized base: the method its recipe recorded, or force "gptq" / "rtn"
    allow_pickle: bool = False  # read adapter_model.bin (a pickle) when there is no safetensors file

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ValueError("adapters: give at least one PEFT adapter directory")
        if self.weights and len(self.weights) != len(self.adapters):
            raise ValueError(f"weights: {len(self.weights)} given for {len(self.adapters)} adapters")
        if self.method not in COMBINATIONS:
            raise ValueError(f"method must be one of {', '.join(COMBINATIONS)}, got {self.method!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.requantize not in REQUANTIZE:
            raise ValueError(f"requantize must be one of {', '.join(REQUANTIZE)}, got {self.requantize!r}")


def _recorded(history: list[dict]) -> dict | None:
    """The last step of the model's recipe that produced quantized codes."""
    return next((s for s in reversed(history) if s.get("pass") in ("gptq", "mixed", "rtn")
                 or (s.get("pass") == "awq" and s.get("quantize", True))), None)


def _method(how: str, recorded: dict | None) -> str:
    """gptq for GPTQ/mixed artifacts; rtn with the module's own scheme for RTN and AWQ ones (AWQ's scales are
    already folded into the weights, and searching them again would rescale layers that stay quantized)."""
    if how != "recorded":
        return how
    return "gptq" if recorded and recorded["pass"] in ("gptq", "mixed") else "rtn"


def _requantize_steps(schemes: dict[str, dict], how: str, history: list[dict]) -> tuple[str, list[dict]]:
    """The method and recipe steps that re-quantize the merged modules (grouped by their own scheme)."""
    recorded = _recorded(history)
    if how == "recorded" and recorded is None:
        log.warning("lora_merge: the quantized base records no quantization step; re-quantizing with RTN")
    how = _method(how, recorded)
    extra = {k: recorded[k] for k in _GPTQ_FIELDS if recorded and k in recorded} if how == "gptq" else {}
    groups: dict[tuple, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(tuple(sorted(scheme.items())), []).append(name)
    steps = [{"pass": how, **dict(key), **extra, "targets": names, "ignore": []} for key, names in groups.items()]
    return how, steps


def _needs_calibration(cfg: LoraMergeConfig, model: nn.Module) -> bool:
    """Only a quantized base re-quantized with GPTQ runs calibration data."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return False
    return _method(cfg.requantize, _recorded(recipe_history(model))) == "gptq"


@register_pass("lora_merge", LoraMergeConfig, needs_calibration=_needs_calibration)
@torch.no_grad()
def run(model: nn.Module, cfg: LoraMergeConfig, calib: torch.Tensor | None, *,
        progress: Progress | None = None) -> PassReport:
    """Merge the adapters into the model in place (re-quantizing quantized modules they touch)."""
    merged, schemes, config, metrics = merge_in_float(model, cfg, progress=progress)
    if merged:
        metrics.update(_requantize(model, merged, schemes, cfg, calib, config))
    log.info("lora_merge: merged %d modules from %d adapters", len(config["merged_modules"]), len(cfg.adapters))
    return PassReport(name="lora_merge", config=config, modules=len(config["merged_modules"]), metrics=metrics)


@torch.no_grad()
def merge_in_float(model: nn.Module, cfg: LoraMergeConfig, *, progress: Progress | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict, dict[str, float]]:
    """Merge the adapters into the model in place; a packed module they touch becomes a float Linear holding its
    dequantized weight plus the delta (the exact merge). Returns (packed module -> its float merged weight, packed
    module -> its scheme, the report's config, its metrics)."""
    adapters = [read_adapter(p, allow_pickle=cfg.allow_pickle) for p in cfg.adapters]
    for a in adapters:
        check_against(a, model)  # everything is checked before the first weight changes
    check_combination(adapters)
    weights = list(cfg.weights) or [1.0] * len(adapters)
    names = sorted({n for a in adapters for n in a.modules})
    merged: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}
    delta_sq = base_sq = 0.0
    for i, name in enumerate(names):
        mod = model.get_submodule(name)
        quantized = isinstance(mod, QuantLinear)
        W = mod.dequantize_weight() if quantized else mod.weight.detach().float()  # (out, in)
        present = [(a.modules[name], w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        if len(adapters) == 1 and present[0][0].magnitude is not None:
            f, w = present[0]
            new = dora_weight(W, w * f.delta(), f.magnitude)
        else:
            method = cfg.method if len(adapters) > 1 else "linear"
            new = W + combine([f.delta() for f, _ in present], [w for _, w in present], method, cfg.density)
        delta_sq += float((new - W).pow(2).sum())
        base_sq += float(W.pow(2).sum())
        if quantized:  # a float Linear for now (run re-quantizes it)
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            dtype=mod.compute_dtype, device=W.device)
            lin.weight.copy_(new)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
            set_submodule(model, name, lin)
            merged[name], schemes[name] = new, mod.scheme.to_dict()
        else:
            mod.weight.copy_(new.to(mod.weight.dtype))
        if progress:
            progress("lora_merge", i + 1, len(names))
    for a in adapters:
        for name, t in a.replaced.items():
            replace_tensor(model, name, t)
    drop_sparsity_record(model, names)
    config = {"adapters": list(cfg.adapters), "weights": weights, "method": cfg.method if len(adapters) > 1 else
              "single", "merged_modules": names, "replaced_tensors": sorted(n for a in adapters for n in a.replaced),
              "dora": any(a.dora for a in adapters)}
    return merged, schemes, config, {"delta_relative_norm": (delta_sq / base_sq) ** 0.5 if base_sq else 0.0}


def _requantize(model: nn.Module, merged: dict[str, torch.Tensor], schemes: dict[str, dict],
                cfg: LoraMergeConfig, calib, config: dict) -> dict[str, float]:
    """Run the recorded quantizer on the merged modules (fresh grids); the weight error it adds."""
    from compress.pipeline import apply
    from compress.recipe import Recipe

    how, steps = _requantize_steps(schemes, cfg.requantize, recipe_history(model))
    apply(model, Recipe.from_steps(steps, where="lora_merge re-quantization"), calib)
    config["requantized"] = {"method": how, "modules": len(merged), "steps": steps}
    err_sq = ref_sq = 0.0
    for name, W in merged.items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantLinear), name
        err_sq += float((q.dequantize_weight() - W).pow(2).sum())
        ref_sq += float(W.pow(2).sum())
    return {"requantization_relative_error": (err_sq / ref_sq) ** 0.5}
