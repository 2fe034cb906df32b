"""What `compress quantize --method M` means: a pass name, or a preset chain of passes."""

from __future__ import annotations

from typing import Any

from compress.recipe import Recipe

# the best method measured on the reference model (bench/results/quantize_vs_peers.json:
# W4 g64 asym 27.60 against GPTQ's 28.98, W3 g64 asym 39.26 against 46.48)
DEFAULT_METHOD = "awq+gptq"
CHAINS = {"awq+gptq": "AWQ scales and clipping (quantize: false), then GPTQ rounding on the same grid"}
TUNABLE = ("awq+gptq", "gptq", "awq", "mixed")  # methods whose rounding step can tune its scales afterwards


def quantize_recipe(method: str | None = None, *, bits: int = 4, target_bits: float | None = None,
                    tune_steps: int = 0, **fields: Any) -> Recipe:
    """The recipe for a weight-quantization method; `fields` are the shared scheme/selection fields.

    `target_bits` asks for bits per layer under a budget (the `mixed` pass,
    GPTQ at each layer's width); it combines with no method but gptq/mixed.
    `tune_steps` > 0 adds a `scale_tune` step that trains the packed scales afterwards
    (`compress.distill.scale_tune`), toward the model the recipe starts from.
    """
    tune = [{"pass": "scale_tune", "steps": tune_steps}] if tune_steps else []
    if target_bits is not None:
        if method not in (None, "gptq", "mixed"):
            raise ValueError(f"--target-bits chooses bits per layer with GPTQ; it does not combine with method {method!r}")
        return Recipe.from_steps([{"pass": "mixed", "target_bits": target_bits, **fields}, *tune])
    method = method or DEFAULT_METHOD
    if tune and method not in TUNABLE:
        raise ValueError(f"scale tuning (--tune-steps) follows a calibrated quantizer ({', '.join(TUNABLE)}); "
                         f"method {method!r} has none")
    if method == "awq+gptq":
        return Recipe.from_steps([{"pass": "awq", "bits": bits, **fields, "quantize": False},
                                  {"pass": "gptq", "bits": bits, **fields}, *tune])
    return Recipe.from_steps([{"pass": method, "bits": bits, **fields}, *tune])


def w8a8_recipe(*, activations: str = "static", observer: str = "minmax", smoothquant: float | str | None = None,
                ignore: list[str] | None = None, **fields: Any) -> Recipe:
    """W8A8 (`compress quantize --bits 8 --activations int8`): optional SmoothQuant, then the `w8a8` pass.

    `smoothquant` is an alpha in [0, 1], "search" (alpha chosen per block), or None (no smoothing).
    """
    sel = {"ignore": ignore} if ignore else {}
    from calibrate.observers import SYMMETRIC_ONLY

    if observer in SYMMETRIC_ONLY:  # TensorRT's entropy calibration is defined for a symmetric grid
        fields.setdefault("symmetric_activations", True)
    steps: list[dict[str, Any]] = []
    if smoothquant is not None:
        sq = {"search": True, "search_observer": observer} if smoothquant == "search" else {"alpha": float(smoothquant)}
        steps.append({"pass": "smoothquant", **sq, **sel})
    steps.append({"pass": "w8a8", "activations": activations, "observer": observer, **sel, **fields})
    return Recipe.from_steps(steps)
