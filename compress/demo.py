"""The demo: quantize the reference model to int4 (RTN, group 128), save it, score both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.models import load_model
from compress.pipeline import Progress, apply
from compress.recipe import Recipe
from compress.reference import reference_model_dir
from compress.runner import evaluate, weights_bytes


def run_demo(out: str | Path, *, windows: int = 64, force: bool = False,
             progress: Progress | None = None) -> dict[str, Any]:
    """fp32 vs int4 perplexity (WikiText-2 protocol) and size of the reference model.

    The int4 number is measured on the saved artifact, reloaded from disk.
    """
    from export.safetensors import export_safetensors

    recipe = Recipe.single("rtn", bits=4, group_size=128, symmetric=True)
    opts = {"windows": windows}
    lm = load_model()
    fp32 = evaluate(lm, ["wikitext2"], options=opts, progress=progress)["wikitext2"]
    reports = apply(lm.model, recipe, progress=progress)
    export_safetensors(lm, out, recipe=recipe.to_list(), reports=reports, force=force)
    del lm
    art = load_model(out)
    int4 = evaluate(art, ["wikitext2"], options=opts, progress=progress)["wikitext2"]
    return {
        "model": "SmolLM2-135M-Instruct",
        "recipe": recipe.to_list(),
        "artifact": str(out),
        "fp32": {"perplexity": fp32["perplexity"], "bytes": weights_bytes(reference_model_dir())},
        "int4": {"perplexity": int4["perplexity"], "bytes": weights_bytes(out),
                 "bits_per_weight": reports[0].metrics["bits_per_weight"]},
        "protocol": fp32["protocol"],
    }
