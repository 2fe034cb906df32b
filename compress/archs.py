"""Facts about a transformers architecture: which ones compress takes, and what the exporters read from a config."""

from __future__ import annotations

from typing import Any

# Model types run through every pass by tests/test_arch_matrix.py (decoder-only LMs, and BERT as a masked LM;
# the README's table says which passes and exporters each takes). Other causal LMs transformers knows load and
# are tried; these are tested.
TESTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox", "qwen3_moe",
          "mixtral", "bert")


class UnsupportedModel(ValueError):
    """A model compress cannot take at all (not a decoder-only language model or encoder transformers knows), or
    not for what was asked (an encoder without a head asked for logits); the CLI exits with status 2 on it."""


def is_encoder(config: Any) -> bool:
    """A bidirectional encoder transformers can build with a masked-LM head (BERT, RoBERTa), whether or not this
    checkpoint has the head: not a decoder, not an encoder-decoder."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    return (type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
            and not getattr(config, "is_encoder_decoder", False))


def is_masked_lm(config: Any) -> bool:
    """An encoder with a masked-language-model head (BertForMaskedLM; a config naming no architectures counts as
    one): quantize, sparsify, merge LoRA; scored by pseudo-perplexity."""
    return is_encoder(config) and any(a.endswith("ForMaskedLM")
                                      for a in getattr(config, "architectures", None) or ["ForMaskedLM"])


def is_bare_encoder(config: Any) -> bool:
    """An encoder without a masked-LM head (BertModel): it yields hidden states, no logits, so it is scored by
    embedding fidelity (eval.embedding) and refused by what needs token probabilities."""
    return is_encoder(config) and not is_masked_lm(config)


def auto_model_class(config: Any):
    """The transformers Auto class that builds the model of `config`: causal LM, masked LM for an encoder with
    its head, the bare model (AutoModel) for one without."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    if is_bare_encoder(config):
        return AutoModel
    return AutoModelForMaskedLM if is_masked_lm(config) else AutoModelForCausalLM


def require_lm_head(config: Any, what: str) -> None:
    """Refuse, in one line, `what` (a pass, task or exporter that needs token probabilities) on an encoder without
    a language-model head; the CLI exits with status 2."""
    if is_bare_encoder(config):
        raise UnsupportedModel(f"{what} needs a language-model head, and model type {config.model_type!r} "
                               f"({', '.join(getattr(config, 'architectures', None) or [])}) is an encoder without "
                               "one (no logits); a bare encoder is quantized, pruned and scored by embedding "
                               "fidelity (compress eval: embedding_cosine)")


def check_causal_lm(config: Any, where: str) -> None:
    """Refuse, in one line, a config compress cannot take: an encoder-decoder (T5), or a model type without a
    causal-LM or masked-LM class. Encoders are taken with or without their masked-LM head."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    kind = None
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder model"
    elif is_encoder(config):
        return
    elif type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = "not a causal language model transformers can build"
    if kind:
        raise UnsupportedModel(f"{where}: model type {config.model_type!r} ({type(config).__name__}) is {kind}; "
                               f"compress takes decoder-only language models and encoders (tested: "
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
