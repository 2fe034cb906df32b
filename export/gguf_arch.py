"""Which Hugging Face architectures the GGUF exporter writes, and the facts of each that llama.cpp reads
differently from transformers: the architecture name, rope bases, Gemma's (1 + w) norms and query scale, and
the model name llama.cpp keys vocabulary fix-ups on."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Hugging Face model_type -> (llama.cpp architecture, q/k rows reordered for llama.cpp's rope)
# (llama.cpp runs qwen2/qwen3/phi3 with NeoX-style rope, HF's own layout; Phi-3 keeps its fused qkv_proj and
# gate_up_proj as llama.cpp's attn_qkv and ffn_up, whose first half its SwiGLU activates, as HF's chunk does)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "phi3": ("phi3", False), "gemma2": ("gemma2", False),
                 "gemma3_text": ("gemma3", False), "qwen3_moe": ("qwen3moe", False), "mixtral": ("llama", True),
                 "gpt_neox": ("gptneox", False)}


# model types llama.cpp cannot run at all (no GGUF of them would load anywhere)
NOT_IN_LLAMA_CPP = {"opt": "OPT"}


def rope_bases(cfg: Any) -> dict[str | None, float] | str:
    """The rope base per layer type (None: every layer), as the fused ONNX graph reads it; llama.cpp holds at
    most two, the full-attention one and the sliding-window one."""
    from export.fused_arch import rope_thetas

    found = rope_thetas(cfg)
    if isinstance(found, dict) and not set(found) <= {None, "full_attention", "sliding_attention"}:
        return f"rope bases for layer types {sorted(map(str, found))}"
    return found


def attention_scale_differs(model: torch.nn.Module) -> str | None:
    """llama.cpp derives Gemma's query scale from the model size (1/sqrt(head_dim), or 1/sqrt(hidden / heads)
    for the 46-layer 27B), not from the file: a model whose `query_pre_attn_scalar` says otherwise is refused."""
    cfg = model.config
    if not cfg.model_type.startswith("gemma"):
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theirs = (cfg.hidden_size / cfg.num_attention_heads if cfg.num_hidden_layers == 46 else head_dim) ** -0.5
    ours = float(model.get_decoder().layers[0].self_attn.scaling)
    if abs(ours - theirs) > 1e-6 * theirs:
        return (f"llama.cpp scales {cfg.model_type} queries by {theirs:.6g} for a model of this size; this model "
                f"uses {ours:.6g} (query_pre_attn_scalar {getattr(cfg, 'query_pre_attn_scalar', None)})")
    return None


def norm_offsets(model: torch.nn.Module) -> dict[str, float]:
    """state-dict key -> 1.0 for the weight of every (1 + w) RMSNorm (Gemma): llama.cpp multiplies by the
    stored weight, so the file holds 1 + w (in float32, as transformers adds it)."""
    from export.fused_arch import norm_offset

    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and not list(m.children()) and \
                not isinstance(m, torch.nn.Embedding | torch.nn.Linear) and type(m).__name__.endswith("RMSNorm"):
            if norm_offset(m):
                out[f"{name}.weight"] = 1.0
    return out


def model_name(name: str, tokens: list[str]) -> str:
    """general.name: the source directory's name, unless llama.cpp would act on it and fail. llama.cpp picks
    Phi-3's token fix-ups by the model *name* ("phi3" / "phi-3" in it) and aborts loading ("unordered_map::at")
    when the vocabulary lacks one of the tokens they touch."""
    phi3_tokens = {"</s>", "<unk>", "<s>", "<|endoftext|>"}
    if any(k in name.lower() for k in ("phi3", "phi-3")) and not phi3_tokens <= set(tokens):
        log.warning("GGUF: model name %r would make llama.cpp apply Phi-3 vocabulary fix-ups to a vocabulary "
                    "without %s; the file is named 'model'", name, sorted(phi3_tokens - set(tokens)))
        return "model"
    return name
