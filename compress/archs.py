"""Facts about a transformers architecture: which ones compress takes, and what the exporters read from a config."""

from __future__ import annotations

from typing import Any

# Model types run through every pass by tests/test_arch_matrix.py (decoder-only LMs, and BERT as a masked LM;
# the README's table says which passes and exporters each takes). Other causal LMs transformers knows load and
# are tried; these are tested.
TESTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox", "qwen3_moe",
          "mixtral", "bert")


class UnsupportedModel(ValueError):
    """A model compress cannot take at all (not a decoder-only language model transformers knows); the CLI exits
    with status 2 on it."""


def is_masked_lm(config: Any) -> bool:
    """An encoder with a masked-language-model head transformers can build (BERT, RoBERTa): what compress takes
    besides decoder-only causal LMs (quantize, sparsify, merge LoRA; scored by pseudo-perplexity)."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    return (type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
            and not getattr(config, "is_encoder_decoder", False)
            and any(a.endswith("ForMaskedLM") for a in getattr(config, "architectures", None) or ["ForMaskedLM"]))


def auto_model_class(config: Any):
    """The transformers Auto class that builds the model of `config`: causal LM, or masked LM for an encoder."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if is_masked_lm(config) else AutoModelForCausalLM


def check_causal_lm(config: Any, where: str) -> None:
    """Refuse, in one line, a config compress cannot take: an encoder-decoder (T5), an encoder without a
    masked-LM head (a bare BertModel), or a model type without a causal-LM or masked-LM class."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = None
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder model"
    elif is_masked_lm(config):
        return
    elif type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        kind = (f"an encoder without a masked-language-model head (architectures "
                f"{getattr(config, 'architectures', None)})")
    elif type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = "not a causal language model transformers can build"
    if kind:
        raise UnsupportedModel(f"{where}: model type {config.model_type!r} ({type(config).__name__}) is {kind}; "
                               f"compress takes decoder-only language models and masked-LM encoders (tested: "
                               f"{', '.join(TESTED)})")


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
