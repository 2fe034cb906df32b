"""Packed token embeddings, and an output layer that multiplies by them (a tied head stored once).

A vocabulary of 49 k x 576 (the reference model) or 262 k x 640 (Gemma 3
270M) kept in float is most of a 4-bit artifact. `QuantEmbedding` holds the
embedding matrix (vocab, hidden) exactly as a `QuantLinear` holds a weight
(out = vocab rows, in = hidden, groups along the hidden dimension, the same
compressed-tensors buffers), so every exporter that writes a QuantLinear
writes it too: GGUF's `token_embd` as Q8_0 / Q4_0 blocks, ONNX as
MatMulNBits blocks that a gather reads. A lookup dequantizes only the rows
it gathers.

`TiedHead` is the output layer of a model whose head shared the embedding's
weight: it has no tensors of its own and multiplies by the embedding's
dequantized matrix, so the tie survives quantization and the matrix is
stored once. The artifact records it (`layout()`: the embedding's name) and
the loader points it back at the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.quantize.grid import dequantize
from compress.quantize.packed import PackedLinear
from compress.quantize.packing import unpack_int32
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import QuantScheme


class QuantEmbedding(QuantLinear):
    """nn.Embedding with its (vocab, hidden) matrix stored as packed integer groups along the hidden dim."""

    kind = "quant_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, *,
                 padding_idx: int | None = None, embed_scale: float | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, scheme, dtype=dtype, device=device)
        self.padding_idx = padding_idx
        if embed_scale is not None:  # Gemma: the lookup is multiplied by sqrt(hidden) (computed, not saved)
            self.register_buffer("embed_scale", torch.tensor(embed_scale, device=device), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, scheme: QuantScheme) -> QuantEmbedding:
        from compress.quantize.grid import quantize_weight

        W = emb.weight.detach().float()
        q, scale, zero = quantize_weight(W, scheme)
        lin = QuantLinear.from_codes(q, scale, zero, scheme, dtype=emb.weight.dtype)
        scale = getattr(emb, "embed_scale", None)
        m = cls(emb.num_embeddings, emb.embedding_dim, lin.scheme, padding_idx=emb.padding_idx,
                embed_scale=None if scale is None else float(scale), dtype=emb.weight.dtype, device=W.device)
        m.load_state_dict(lin.state_dict())
        return m

    @classmethod
    def from_layout(cls, layout: dict, dtype: torch.dtype) -> QuantEmbedding:
        return cls(layout["num_embeddings"], layout["embedding_dim"], QuantScheme(**layout["scheme"]),
                   padding_idx=layout.get("padding_idx"), embed_scale=layout.get("embed_scale"), dtype=dtype)

    def layout(self) -> dict:
        return {"kind": self.kind, "scheme": self.scheme.to_dict(), "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                **({"embed_scale": float(self.embed_scale)} if hasattr(self, "embed_scale") else {}),
                **({"packing": "dense"} if 32 % self.scheme.bits else {})}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dequantized is not None:
            w = F.embedding(ids, self.dequantized)
        else:
            rows = ids.reshape(-1)
            codes = unpack_int32(self.weight_packed[rows], self.scheme.bits, self.in_features)
            zero = self.zero_point()[rows]  # (symmetric: a constant; asymmetric: all rows' points are small)
            w = dequantize(codes, self.weight_scale[rows].float(), zero, self.scheme)
            w = w.view(*ids.shape, self.in_features)
        w = w.to(self.compute_dtype)
        return w * self.embed_scale.to(w.dtype) if hasattr(self, "embed_scale") else w

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={s.bits}, group_size={s.group_size}, "
                f"symmetric={s.symmetric}")


class TiedHead(PackedLinear):
    """logits = x @ E^T with E the dequantized matrix of a QuantEmbedding; no tensors of its own."""

    kind = "tied_head"

    def __init__(self, embedding_name: str, embedding: QuantEmbedding | None = None) -> None:
        super().__init__()
        self.embedding_name = embedding_name
        self._embedding = [embedding]  # a list: not a registered submodule (its tensors are the embedding's)

    @property
    def embedding(self) -> QuantEmbedding:
        if self._embedding[0] is None:
            raise ValueError(f"tied head: the embedding {self.embedding_name} was not linked")
        return self._embedding[0]

    def link(self, model: nn.Module) -> None:
        """Point at the model's embedding module named `embedding_name` (after an artifact is loaded)."""
        emb = model.get_submodule(self.embedding_name)
        if not isinstance(emb, QuantEmbedding):
            raise ValueError(f"tied head: {self.embedding_name} is a {type(emb).__name__}, not a QuantEmbedding")
        self._embedding[0] = emb

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def bias(self) -> None:
        return None

    @classmethod
    def from_layout(cls, layout: dict, dtype: torch.dtype) -> TiedHead:
        return cls(layout["embedding"])

    def layout(self) -> dict:
        return {"kind": self.kind, "embedding": self.embedding_name}

    def dequantize_weight(self) -> torch.Tensor:
        return self.embedding.dequantize_weight()

    def storage_bits(self) -> int:
        return 0  # stored once, as the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        w = emb.dequantized if emb.dequantized is not None else emb.dequantize_weight()
        return F.linear(x, w.to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to {self.embedding_name}"


def link_tied_heads(model: nn.Module) -> None:
    """Point every TiedHead of `model` at its embedding (after loading or deep-copying a model)."""
    for m in model.modules():
        if isinstance(m, TiedHead):
            m.link(model)
