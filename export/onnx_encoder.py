"""A BERT-style encoder (BertForMaskedLM) as a graph of ONNX Runtime's fused operators.

    Gather x 3 + LayerNormalization        word + position + token-type embeddings, normed
    MatMulNBits / MatMul (+ Add)           query, key, value, attention output, intermediate, output
    MultiHeadAttention                     bidirectional attention; padded keys masked by the attention mask
    SkipLayerNormalization                 the post-norm residual: LayerNorm(sublayer + x) in one kernel
    Gelu / FastGelu / Relu                 the intermediate activation
    the masked-LM head                     dense, activation, LayerNorm, decoder (tied to the word embeddings)

Inputs `input_ids`, `attention_mask` (padding allowed: 0 marks a padded token) and `token_type_ids`, all
(batch, seq) int64; outputs `last_hidden_state` (batch, seq, hidden) and `logits` (batch, seq, vocab): the
names and layouts of optimum's BERT exports. Absolute position embeddings only.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from export.fused_arch import activation, activation_name
from export.onnx_graph import Graph, f32

ENCODER_TYPES = ("bert",)


def encoder_supported(model: nn.Module) -> str | None:
    """None when the encoder graph can express `model`, else the reason it cannot."""
    if why := encoder_config_supported(model.config):
        return why
    if getattr(model, "cls", None) is None or not hasattr(model.cls, "predictions"):
        return "an encoder without its masked-LM head"
    return None


def encoder_config_supported(cfg) -> str | None:
    """What the config alone says against the encoder graph (None: nothing)."""
    if cfg.model_type not in ENCODER_TYPES:
        return f"encoder model type {cfg.model_type!r} (encoder graphs: {', '.join(ENCODER_TYPES)})"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {cfg.position_embedding_type!r}"
    if activation(cfg) is None:
        return f"activation {activation_name(cfg)}"
    return None


def build_encoder_graph(model: nn.Module, *, accuracy_level: int = 0):
    """The ModelProto of a BertForMaskedLM (float Linears and QuantLinears); MatMulNBits counts by bits."""
    from onnx import TensorProto

    why = encoder_supported(model)
    if why is not None:
        raise ValueError(f"the ONNX encoder graph does not support {why}")
    cfg, base = model.config, model.bert
    gb = Graph(accuracy_level)
    init, node, linear = gb.init, gb.node, gb.linear
    act = activation(cfg)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        gb.io(name, "INT64", ["batch", "seq"])
    gb.io("last_hidden_state", "FLOAT", ["batch", "seq", cfg.hidden_size], output=True)
    gb.io("logits", "FLOAT", ["batch", "seq", cfg.vocab_size], output=True)

    emb = base.embeddings
    node("Gather", [init("embed_tokens", f32(emb.word_embeddings.weight)), "input_ids"], ["words"])
    node("Gather", [init("token_type_embeddings", f32(emb.token_type_embeddings.weight)), "token_type_ids"],
         ["types"])
    node("Shape", ["input_ids"], ["ids_shape"])
    node("Gather", ["ids_shape", init("idx_1", np.array(1, np.int64))], ["seq_len"], axis=0)
    node("Range", [init("zero_i64", np.array(0, np.int64)), "seq_len", init("one_i64", np.array(1, np.int64))],
         ["positions"])
    node("Gather", [init("position_embeddings", f32(emb.position_embeddings.weight)), "positions"], ["places"])
    node("Add", ["words", "types"], ["words_types"])
    node("Add", ["words_types", "places"], ["h0"])
    x = gb.plain_norm("h0", emb.LayerNorm, "embeddings.LayerNorm")
    node("Cast", ["attention_mask"], ["key_padding_mask"], to=TensorProto.INT32)  # (batch, seq): 1 attends

    for i, layer in enumerate(base.encoder.layer):
        p = f"encoder.layer.{i}"
        att = layer.attention.self
        q, k, v = (linear(x, getattr(att, t), f"{p}.attention.self.{t}") for t in ("query", "key", "value"))
        node("MultiHeadAttention", [q, k, v, "", "key_padding_mask"], [f"{p}.attn"], "com.microsoft",
             num_heads=cfg.num_attention_heads, scale=float(att.scaling))
        o = linear(f"{p}.attn", layer.attention.output.dense, f"{p}.attention.output.dense")
        x, _ = gb.skip_norm(o, x, layer.attention.output.LayerNorm, f"{p}.attention.output.LayerNorm")
        mid = gb.activation(linear(x, layer.intermediate.dense, f"{p}.intermediate.dense"), act,
                            f"{p}.intermediate")
        out = linear(mid, layer.output.dense, f"{p}.output.dense")
        x, _ = gb.skip_norm(out, x, layer.output.LayerNorm, f"{p}.output.LayerNorm")
    node("Identity", [x], ["last_hidden_state"])

    head = model.cls.predictions
    t = gb.activation(linear(x, head.transform.dense, "cls.predictions.transform.dense"), act,
                      "cls.predictions.transform")  # (the head's activation is the config's hidden_act too)
    t = gb.plain_norm(t, head.transform.LayerNorm, "cls.predictions.transform.LayerNorm")
    logits = gb.output_layer(t, head.decoder, emb.word_embeddings, "cls.predictions.decoder")
    node("Identity", [logits], ["logits"])
    return gb.model("compress-fused-encoder"), gb.used
