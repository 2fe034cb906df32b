"""The `quantization_config` block written into config.json of a quantized artifact."""

from __future__ import annotations

from typing import Any


def quantization_config(modules: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any] | None:
    """A compressed-tensors style `quantization_config` block: one group per distinct scheme.

    W8A8 modules (`kind` "w8a8") form "int-quantized" groups with their
    activation scheme; a model holding both kinds is "mixed-precision".
    transformers + compressed-tensors runs a static W8A8 artifact with the
    same logits (tested); for dynamic per-token activations it takes
    max|x| / 127.5 as the scale where we (and vLLM's int8 kernels) take
    max|x| / 127, a slightly different grid.

    `ignore` names the Linear modules left in float. Verified
    (tests/test_arch_matrix.py, tests/export/test_compressed_tensors.py):
    transformers 5 with compressed-tensors 0.20 loads our symmetric 8/4/3/2-bit
    artifacts, group or per-channel, and computes the same logits; its
    decompressor reads our asymmetric ones as the same weights, but its meta
    skeleton sizes an asymmetric zero point unpacked, so transformers refuses
    those checkpoints (any writer's) until that is fixed upstream.
    """
    if not modules:
        return None
    groups: dict[tuple, list[str]] = {}
    w8a8: dict[str, list[str]] = {}
    for name, info in modules.items():
        if info.get("kind") == "tied_head":  # no tensors: the embedding's group holds the matrix
            continue
        if info.get("kind") == "w8a8":
            w8a8.setdefault(info["activations"], []).append(name)
            continue
        s = info["scheme"]
        groups.setdefault((s["bits"], s["group_size"], s["symmetric"]), []).append(name)
    config_groups = {}
    for activations, names in sorted(w8a8.items()):
        config_groups[f"group_{len(config_groups)}"] = _w8a8_group(names, activations)
    formats = ["int-quantized"] if w8a8 else []
    if groups:
        formats.append("pack-quantized")
    for (bits, gs, sym), names in sorted(groups.items()):
        config_groups[f"group_{len(config_groups)}"] = {
            "targets": names,
            "format": "pack-quantized",
            "weights": {
                "num_bits": bits, "type": "int", "symmetric": sym,
                "strategy": "channel" if gs == -1 else "group",
                "group_size": None if gs == -1 else gs,
                "dynamic": False, "actorder": None, "block_structure": None,
                "observer": "minmax", "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def _w8a8_group(names: list[str], activations: str) -> dict[str, Any]:
    """int8 weights per channel and int8 activations: static per tensor or dynamic per token.

    The static activation zero point is stored (possibly 0), so the group is
    written asymmetric; compressed-tensors reads `input_scale` and
    `input_zero_point` for it.
    """
    static = activations == "static"
    return {
        "targets": names,
        "format": "int-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                    "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                    "observer_kwargs": {}},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": not static,
                              "strategy": "tensor" if static else "token", "group_size": None,
                              "dynamic": not static, "actorder": None, "block_structure": None,
                              "observer": "minmax" if static else None, "observer_kwargs": {}},
        "output_activations": None,
    }
