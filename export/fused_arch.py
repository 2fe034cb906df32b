"""What the fused ONNX decoder graph (export/onnx_fused.py) can express, and the architecture facts it reads:
the rope base per layer type, the MLP activation, and whether a norm multiplies by w or by (1 + w), told by
running the norm rather than by a per-architecture table."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from compress.archs import default_rope_theta

FUSED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "opt", "gpt_neox", "qwen3_moe",
               "mixtral")  # (module docstring)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu", "gelu": "gelu"}


def rope_thetas(cfg: Any) -> dict[str | None, float] | str:
    """RoPE base per attention layer type (key None: one for every layer), or why the graph cannot rotate."""
    params = getattr(cfg, "rope_parameters", None) or {}  # (how much of a head rotates: `rotary_fraction`)
    if params and all(isinstance(v, dict) for v in params.values()):  # Gemma 3: one rope per layer type
        found = {t: default_rope_theta(SimpleNamespace(rope_parameters=p)) for t, p in params.items()}
        bad = [f"{t}: {v}" for t, v in found.items() if isinstance(v, str)]
        return "; ".join(bad) if bad else found
    theta = default_rope_theta(cfg)
    return theta if isinstance(theta, str) else {None: theta}


def rotary_fraction(cfg: Any) -> float:
    """The fraction of each head's dimensions that are rotated (GPT-NeoX: 0.25; most models: all)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0)


def activation(cfg: Any) -> str | None:
    return ACTIVATIONS.get(activation_name(cfg))


def activation_name(cfg: Any) -> str:
    """The MLP activation's transformers name (Gemma: hidden_activation; OPT: activation_function)."""
    return (getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
            or getattr(cfg, "activation_function", None) or "silu")


def fused_supported(model: nn.Module) -> str | None:
    """None when the fused graph can express `model`, else the reason it cannot."""
    return fused_config_supported(model.config) or moe_unsupported(model)


def fused_config_supported(cfg: Any) -> str | None:
    """What the config alone says against the fused graph (None: nothing; the model may still be refused, for
    its mixture-of-experts blocks: `moe_unsupported`)."""
    if getattr(cfg, "model_type", None) not in FUSED_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} (fused graphs: {', '.join(FUSED_TYPES)})"
    if cfg.model_type == "opt":  # learned positions, pre-norm blocks, no projection around the blocks
        if not cfg.do_layer_norm_before or cfg.word_embed_proj_dim != cfg.hidden_size:
            return "OPT with post-norm blocks or a projection around them (opt-350m)"
    elif isinstance(why := rope_thetas(cfg), str):
        return why
    if activation(cfg) is None:
        return f"activation {activation_name(cfg)}"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    return None


def moe_unsupported(model: nn.Module) -> str | None:
    """Why a mixture-of-experts layer of `model` cannot be written (None if it has none or all can be): the
    graph takes a block of a softmax top-k router and per-expert MLPs (`calibrate.experts.Experts`), nothing
    else (no shared expert, no router bias)."""
    from calibrate.experts import Experts, fused_experts

    if fused := fused_experts(model):
        return f"fused experts of an unknown layout ({next(iter(fused))})"
    for name, m in model.named_modules():
        if isinstance(getattr(m, "experts", None), Experts):
            extra = sorted(set(dict(m.named_children())) - {"gate", "experts"})
            if extra:
                return f"a mixture-of-experts block with {', '.join(extra)} ({name})"
            if router_renormalises(m.gate) is None:
                return f"the router {type(m.gate).__name__} ({name}.gate): not a softmax top-k over experts"
    return None


def router_renormalises(gate: nn.Module) -> bool | None:
    """Whether a MoE router's weights are its softmax's top k renormalised to sum 1 (Mixtral, Qwen3-MoE with
    norm_topk_prob) or taken as they are (False); None if it is neither. Told by running the router."""
    w, k = getattr(gate, "weight", None), getattr(gate, "top_k", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(k, int):
        return None
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = gate(x.to(w.dtype))
        top, idx = torch.softmax(x @ w.float().T, dim=-1).topk(k, dim=-1)
    if not isinstance(out, tuple) or len(out) != 3 or not torch.equal(out[2], idx):
        return None
    for renorm in (False, True):
        if torch.allclose(out[1].float(), top / top.sum(-1, keepdim=True) if renorm else top, atol=1e-5):
            return renorm
    return None


def norm_offset(norm: nn.Module) -> float:
    """0 for an RMSNorm computing w * x / rms(x), 1 for Gemma's (1 + w) * x / rms(x): told by running it."""
    w = next(p for p in norm.parameters() if p.dim() == 1)
    x = torch.linspace(-2, 3, w.numel(), dtype=torch.float32)[None]
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    with torch.no_grad():
        y = norm(x.to(w.dtype)).float()
    for offset in (0.0, 1.0):
        if torch.allclose(y, unit * (w.float() + offset), rtol=1e-4, atol=1e-5):
            return offset
    raise ValueError(f"the fused ONNX graph does not support the norm {type(norm).__name__}")
