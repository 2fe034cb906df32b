"""Compressed safetensors artifact: a Hugging Face directory with packed integer weights.

Quantized Linear layers are stored with compressed-tensors' pack-quantized
tensor names (`weight_packed`, `weight_scale`, `weight_zero_point`,
`weight_shape`), everything else as ordinary float tensors. `compress.json`
records the recipe, tool versions, the source hash and the per-module
layout that `compress.models.load_model` uses to rebuild the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.models import LoadedModel, save_model
from compress.registry import register_exporter


@register_exporter("safetensors")
def export_safetensors(lm: LoadedModel, out: str | Path, *, recipe: list[dict[str, Any]] | None = None,
                       reports: list[Any] = (), force: bool = False) -> Path:
    """Hugging Face directory with packed integer weights (compressed-tensors tensor layout)."""
    return save_model(lm, out, recipe=recipe, reports=reports, force=force)
