"""Facts about a transformers architecture that the exporters read from its config."""

from __future__ import annotations

from typing import Any


def default_rope_theta(config: Any) -> float | str:
    """The RoPE base of a model with plain (unscaled) rotary embeddings, or the reason it has none.

    transformers 5 keeps RoPE settings in `config.rope_parameters` ({"rope_type": "default",
    "rope_theta": ...}, or one such dict per attention layer type); older configs carried a top-level
    `rope_theta` and an optional `rope_scaling`.
    """
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return f"RoPE per layer type ({', '.join(sorted(params))})"
    if params.get("rope_type", "default") != "default":
        return f"RoPE scaling {params}"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta is not None else "no rope_theta in the config"
