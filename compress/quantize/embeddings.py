"""`quantize_embeddings`: the token embedding (and a head tied to it) as packed integer groups.

Round to nearest, symmetric, groups of 32 along the hidden dimension with
float16 scales by default: for 8 bits that is exactly llama.cpp's Q8_0 and
for 4 bits its Q4_0, and ONNX Runtime's MatMulNBits holds both, so every
format stores the same numbers (GGUF `token_embd`, the ONNX graph's gather
and tied head, the safetensors artifact). A head that shared the embedding's
weight becomes a `TiedHead` over the quantized matrix: one copy on disk,
and the output layer then computes with the quantized embedding too (the
perplexity cost is measured in bench/results/embeddings.json). An untied
head is left as it is (quantize it with the weight passes: `--ignore` without
`lm_head`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from calibrate.blocks import modules_in_turn
from compress import targets as tg
from compress.pipeline import PassReport, Progress
from compress.quantize.qembedding import QuantEmbedding, TiedHead
from compress.quantize.scheme import SCALE_DTYPES, QuantScheme
from compress.registry import register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EmbeddingQuantConfig:
    """The input embedding's scheme (symmetric round to nearest)."""

    bits: Literal[8, 4] = 8  # 8: Q8_0's numbers; 4: Q4_0's
    group_size: int = 32  # hidden-dimension entries per scale (-1: one scale per token row)
    scale_dtype: Literal[tuple(SCALE_DTYPES)] = "float16"

    def __post_init__(self) -> None:
        self.scheme  # noqa: B018 (validates the group size and scale dtype)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, symmetric=True, scale_dtype=self.scale_dtype)

    def check_model(self, model: nn.Module) -> None:
        """Refuse, before any work, a model whose embedding this pass cannot replace."""
        _embedding(model)
        emb = model.get_input_embeddings()
        try:
            self.scheme.stored(emb.embedding_dim)
        except ValueError as e:
            raise ValueError(f"embedding: {e}") from None


def _embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the input embedding, or a ValueError saying why it cannot be quantized."""
    from compress.archs import is_encoder

    if is_encoder(model.config):
        raise ValueError("embedding quantization applies to decoder language models (an encoder's MLM decoder "
                         "has its own bias on the tied matrix)")
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        raise ValueError("the embedding is already quantized")
    plain = type(emb) is nn.Embedding or (isinstance(emb, nn.Embedding) and hasattr(emb, "embed_scale"))
    if not plain or emb.max_norm is not None:
        raise ValueError(f"embedding {type(emb).__name__}: only a plain lookup (optionally scaled, as Gemma's) can "
                         "be quantized")
    return next(n for n, m in model.named_modules() if m is emb), emb


def _tied_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The output layer when it shares the embedding's weight (a float Linear under a tied config)."""
    head = model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or type(head) is not nn.Linear or head.bias is not None:
        return None
    return next(n for n, m in model.named_modules() if m is head), head


@register_pass("quantize_embeddings", EmbeddingQuantConfig, streams_blocks=True)
@torch.no_grad()
def run(model: nn.Module, cfg: EmbeddingQuantConfig, calib=None, *, progress: Progress | None = None) -> PassReport:
    """Replace the input embedding by a QuantEmbedding (and a head tied to it by a TiedHead)."""
    name, found = _embedding(model)
    tied = _tied_head(model)
    for _, emb in modules_in_turn(model, {name: found}):  # lazily loaded: its weight is read now
        W = emb.weight.detach().float()
        q = QuantEmbedding.from_embedding(emb, cfg.scheme)
        err = float((q.dequantize_weight() - W).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30)) ** 0.5
        tg.set_submodule(model, name, q)
        emb.to("meta")
        if tied is not None:  # (before a lazy store re-ties the model as it releases the embedding)
            tg.set_submodule(model, tied[0], TiedHead(name, q))
            model.config.tie_word_embeddings = False  # the head no longer aliases a float weight
            if hasattr(model, "get_expanded_tied_weights_keys"):  # what transformers' save and tie_weights read
                model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    if progress:
        progress("quantize_embeddings", 1, 1)
    log.info("quantize_embeddings: %s to %d bits%s", name, cfg.bits, f", {tied[0]} tied to it" if tied else "")
    return PassReport(name="quantize_embeddings", modules=1 + (tied is not None),
                      config={"embedding": name, "tied_head": tied[0] if tied else None},
                      metrics={"relative_weight_error": err,
                               "bits_per_weight": q.storage_bits() / (q.in_features * q.out_features)})
