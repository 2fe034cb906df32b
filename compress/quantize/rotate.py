"""`rotate`: orthogonal rotations folded into the weights, so that a quantizer after it sees fewer outliers.

QuaRot (Ashkboos et al. 2024, https://arxiv.org/abs/2404.00456) and SpinQuant
(Liu et al. 2024, https://arxiv.org/abs/2405.16406) rotate the residual stream
of an RMSNorm model by an orthogonal Q (their R1) and each attention head's
values by an orthogonal R (R2). Both fold into the weights, so the result is an
ordinary float model computing the same function, whose weights and
activations have their outliers spread over many channels:

1. every RMSNorm's weight w is folded into the Linears that read its output
   (W <- W diag(w), w <- 1): a weightless RMSNorm commutes with Q, since
   rms(x Q) = rms(x);
2. R1: the embedding and every Linear writing the residual stream (o_proj,
   down_proj) produce x Q (E <- E Q, W <- Q^T W); every Linear reading it
   (q/k/v, gate/up, the output layer) takes it back (W <- W Q);
3. R2: each value head produces v R (W_v <- R^T W_v per head) and o_proj reads
   each head's slice through R (W_o[:, head] <- W_o[:, head] R).

Q is a random Hadamard matrix (a Walsh-Hadamard matrix times random signs,
scaled) when the width is a power of two, else a random orthogonal matrix (QR
of a Gaussian); R is the same construction at the head width. Everything is
computed in float64 and the model's logits are unchanged to float rounding
(tested within 1e-4). An output layer tied to the embedding is untied (it
reads the final norm's folded weight, the embedding does not). Taken:
decoders with pre-norm RMSNorm blocks and separate projections (llama,
mistral, qwen2, qwen3); others are refused with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from calibrate.blocks import decoder_blocks
from compress.pipeline import PassReport, Progress
from compress.registry import register_pass

log = logging.getLogger(__name__)

TAKES = ("llama", "mistral", "qwen2", "qwen3")
READERS = {"input_layernorm": ("q_proj", "k_proj", "v_proj"), "post_attention_layernorm": ("gate_proj", "up_proj")}


@dataclass(frozen=True, kw_only=True)
class RotateConfig:
    """Which rotations to fold in, and the seed of their random signs / matrices."""

    residual: bool = True  # R1: the residual stream
    values: bool = True  # R2: each attention head's values (v_proj rows, o_proj columns)
    seed: int = 0

    def check_model(self, model: nn.Module) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"rotate: {why}")


def unsupported(model: nn.Module) -> str | None:
    """Why the rotations cannot be folded into `model` (None if they can)."""
    mt = getattr(model.config, "model_type", None)
    if mt not in TAKES:
        return f"model type {mt!r}: rotations fold into pre-norm RMSNorm decoders with separate projections " \
               f"({', '.join(TAKES)})"
    for i, layer in enumerate(decoder_blocks(model)[1]):
        for norm in READERS:
            n = getattr(layer, norm, None)
            if n is None or isinstance(n, nn.LayerNorm) or getattr(n, "bias", None) is not None:
                return f"block {i}: {norm} is not a weight-only RMSNorm"
        if not all(isinstance(getattr(layer.self_attn, p, None), nn.Linear) for p in READERS["input_layernorm"]) or \
                not all(isinstance(getattr(layer.mlp, p, None), nn.Linear) for p in READERS["post_attention_layernorm"]):
            return f"block {i}: projections that are not float nn.Linear (rotate before quantizing)"
    return None


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal n x n matrix (float64): Hadamard with random signs for a power of two, else QR."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:  # Sylvester's construction
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
        return h * signs / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # (signs: the Haar-distributed Q)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


@register_pass("rotate", RotateConfig)
@torch.no_grad()
def run(model: nn.Module, cfg: RotateConfig, calib=None, *, progress: Progress | None = None) -> PassReport:
    """Fold the norms, then the residual (R1) and value (R2) rotations, into `model`'s weights."""
    cfg.check_model(model)
    g = torch.Generator().manual_seed(cfg.seed)
    base = model.get_decoder()
    _, layers = decoder_blocks(model)
    H = model.config.hidden_size
    head_dim = getattr(model.config, "head_dim", None) or H // model.config.num_attention_heads
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    untied = cfg.residual and (head.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False)))
    if untied:  # the head reads the final norm's folded weight, the embedding does not
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    Q = orthogonal(H, g) if cfg.residual else torch.eye(H, dtype=torch.float64)
    R = orthogonal(head_dim, g) if cfg.values else None

    def fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
        w = norm.weight.double()
        for lin in readers:
            _set(lin.weight, lin.weight.double() * w[None, :] @ Q)
        _set(norm.weight, torch.ones_like(w))

    if cfg.residual:
        _set(emb.weight, emb.weight.double() @ Q)
    for i, layer in enumerate(layers):
        att, mlp = layer.self_attn, layer.mlp
        if cfg.residual:  # (R2 alone needs no weightless norm)
            fold_norm(layer.input_layernorm, [getattr(att, p) for p in READERS["input_layernorm"]])
            fold_norm(layer.post_attention_layernorm, [getattr(mlp, p) for p in READERS["post_attention_layernorm"]])
        if R is not None:
            v, o = att.v_proj, att.o_proj
            nkv = v.out_features // head_dim
            _set(v.weight, (R.T @ v.weight.double().view(nkv, head_dim, -1)).reshape(v.weight.shape))
            if v.bias is not None:
                _set(v.bias, (v.bias.double().view(nkv, head_dim) @ R).reshape(-1))
            nq = o.in_features // head_dim
            _set(o.weight, (o.weight.double().view(H, nq, head_dim) @ R).reshape(o.weight.shape))
        for writer in (att.o_proj, mlp.down_proj) if cfg.residual else ():
            _set(writer.weight, Q.T @ writer.weight.double())
            if writer.bias is not None:
                _set(writer.bias, writer.bias.double() @ Q)
        if progress:
            progress("rotate", i + 1, len(layers))
    if cfg.residual:
        fold_norm(base.norm, [head])
    log.info("rotate: folded %s into %d blocks", " and ".join(
        n for n, on in (("R1 (residual)", cfg.residual), ("R2 (values)", cfg.values)) if on), len(layers))
    return PassReport(name="rotate", modules=len(layers), config={"hidden": H, "head_dim": head_dim,
                                                                   "untied_head": untied})
