"""The `quantization_config` block written into config.json of a quantized artifact."""

from __future__ import annotations

from typing import Any


def quantization_config(modules: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any] | None:
    """A compressed-tensors style `quantization_config` block: one group per distinct scheme.

    `ignore` names the Linear modules left in float. Verified
    (tests/export/test_compressed_tensors.py): transformers 4.57 with
    compressed-tensors 0.20 loads our symmetric 4- and 8-bit artifacts, group
    or per-channel, and computes the same logits. Not loadable there yet: a
    group size that does not divide a layer's in_features (compressed-tensors
    refuses; our last group is shorter), 3-bit codes (we pack 10 per word,
    compressed-tensors 0.19+ packs densely), and asymmetric schemes under
    transformers < 5 (it sizes the zero point unpacked; the layout itself is
    compressed-tensors' packed one).
    """
    if not modules:
        return None
    groups: dict[tuple, list[str]] = {}
    for name, info in modules.items():
        s = info["scheme"]
        groups.setdefault((s["bits"], s["group_size"], s["symmetric"]), []).append(name)
    config_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
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
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }
