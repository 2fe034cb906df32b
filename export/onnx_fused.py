"""A lean decoder graph for Llama-family models, built from ONNX Runtime's fused operators.

optimum's exported graph reproduces the PyTorch module op for op: on the
reference model, 7,400 nodes, of which about 2,000 run on every decoding
step computing shapes, masks, rotary tables and the repeat of grouped KV
heads. At batch 1 on a CPU those small kernels cost more than the weights.
This builder writes the same computation with ONNX Runtime's contrib
operators, about 12 nodes per decoder layer:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm in one kernel
    MatMulNBits / MatMul               q, k, v, o, gate, up, down, lm_head
    QuantizeLinear + MatMulIntegerToFloat   W8A8 Linears, static activations
                                       (one QuantizeLinear per shared input);
                                       per-token dynamic ones as the same
                                       ops spelled out (scale, round, cast,
                                       MatMulInteger, rescale)
    GroupQueryAttention                rotary embedding (non-interleaved, as
                                       HF's rotate_half), grouped KV heads,
                                       causal softmax and the KV cache concat

Inputs and outputs keep optimum's names and layouts (`input_ids`,
`attention_mask`, `past_key_values.{i}.key|value` as (batch, kv heads, past,
head dim), `logits`, `present.{i}.key|value`), so every runtime and loop
that drives an optimum export drives this one. Rows of the attention mask
must be all ones (no left padding): GroupQueryAttention takes each
sequence's length from the mask's row sum.

Supported: `model_type` llama / mistral (without sliding window), qwen2 (q/k/v
biases), qwen3 (RMSNorm of each query and key head before the rotary
embedding: one SimplifiedLayerNormalization over a (batch, seq, heads, head
dim) view), phi3 (fused `qkv_proj` and `gate_up_proj`: one MatMul or
MatMulNBits each, then a Split), gemma2 / gemma3_text ((1 + w) norms, folded
into the weights; a norm after each sublayer; embeddings scaled by
sqrt(hidden); GELU-tanh as FastGelu; attention scale and logit soft-capping
and sliding windows as GroupQueryAttention attributes; final-logit
soft-capping; Gemma 3's rope base per layer type as one cos/sin table pair
each), opt (pre-norm LayerNorms with biases as LayerNormalization /
SkipLayerNormalization, learned positions offset by 2 gathered for the
chunk's positions, GroupQueryAttention without rotary, ReLU MLP), gpt_neox
(per-head [q; k; v] rows reshaped and split, the rotary embedding on a
quarter of each head by RotaryEmbedding nodes before an attention that
rotates nothing, parallel residual: x + attn(ln1(x)) + mlp(ln2(x)), GELU);
RMSNorm,
default rope (no scaling, full rotary), sliding windows (Mistral's on every
layer). Other architectures are refused.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from calibrate.experts import Experts
from compress.quantize.qembedding import QuantEmbedding
from export.fused_arch import (
    activation,
    fused_supported,
    rope_thetas,
    rotary_fraction,
    router_renormalises,
)
from export.onnx_graph import Graph, f32


def part(module: nn.Module, *names: str) -> nn.Module:
    """The first of `names` that `module` has (Llama's name first, then OPT's or GPT-NeoX's)."""
    return getattr(module, next(n for n in names if hasattr(module, n)))


def build_fused_graph(model: nn.Module, *, accuracy_level: int = 0):
    """The ModelProto of `model` (float Linears and QuantLinears) as a fused decoder graph; counts by bits."""
    from onnx import TensorProto

    why = fused_supported(model)
    if why is not None:
        raise ValueError(f"the fused ONNX graph does not support {why}")
    cfg = model.config
    H = cfg.hidden_size
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or H // nh
    I = getattr(cfg, "intermediate_size", None)  # noqa: E741 (the MLP width, as in the papers; OPT: ffn_dim)
    max_pos = int(cfg.max_position_embeddings)
    rd = int(hd * rotary_fraction(cfg))  # rotated dimensions of a head (GPT-NeoX: a quarter)
    partial = rd != hd  # then RotaryEmbedding nodes rotate q and k, and GroupQueryAttention does not
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    gb = Graph(accuracy_level)
    init, const, node, linear, plain_norm = gb.init, gb.const, gb.node, gb.linear, gb.plain_norm

    # per-sequence lengths for GroupQueryAttention: seqlens_k = total - 1 (int32), total = mask width
    node("ReduceSum", ["attention_mask", init("axes_1", np.array([1], np.int64))], ["mask_sum"], keepdims=0)
    node("Sub", ["mask_sum", init("one_i64", np.array(1, np.int64))], ["seqlens_k_64"])
    node("Cast", ["seqlens_k_64"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", init("idx_1", np.array(1, np.int64))], ["total_len_64"], axis=0)
    node("Cast", ["total_len_64"], ["total_len"], to=TensorProto.INT32)
    # rotary tables (max positions, head_dim / 2): HF's default rope, cos/sin of position * inv_freq; one pair
    # per attention layer type when their bases differ (Gemma 3)
    caches = {}
    for kind, theta in (rope_thetas(cfg).items() if not hasattr(base, "embed_positions") else ()):
        inv_freq = 1.0 / theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)  # (rd / 2,)
        ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq[None]  # (max_pos, rd / 2)
        tag = f"_{kind}" if kind else ""
        caches[kind] = (init(f"cos_cache{tag}", np.cos(ang).astype(np.float32)),
                        init(f"sin_cache{tag}", np.sin(ang).astype(np.float32)))
    act = activation(cfg)

    embed = part(base, "embed_tokens", "embed_in")
    if isinstance(embed, QuantEmbedding):  # rows dequantized from the MatMulNBits blocks a tied head reads too
        h = gb.quant_gather("input_ids", embed, next(n for n, m in model.named_modules() if m is embed))
    else:
        h = node("Gather", [init("embed_tokens", f32(embed.weight)), "input_ids"], ["h0"])[0]
    if (scale := getattr(embed, "embed_scale", None)) is not None:  # Gemma: sqrt(hidden), float32
        h = node("Mul", [h, init("embed_scale", f32(scale).reshape(()))], ["h0_scaled"])[0]
    table = getattr(base, "embed_positions", None)  # OPT: learned positions, offset by 2
    if table is not None or partial:  # the chunk's first position: total - seq (rows of the mask are all ones)
        node("Shape", ["input_ids"], ["ids_shape"])
        node("Gather", ["ids_shape", "idx_1"], ["seq_len_64"], axis=0)
        node("Sub", ["total_len_64", "seq_len_64"], ["past_len_64"])
        node("Reshape", ["past_len_64", const("shape_1", np.array([1], np.int64))], ["past_len_1d"])
    if table is not None:
        node("Range", ["past_len_64", "total_len_64", "one_i64"], ["positions"])
        node("Add", ["positions", init("position_offset", np.array(table.offset, np.int64))], ["position_rows"])
        node("Gather", [init("embed_positions", f32(table.weight)), "position_rows"], ["h0_positions"])
        h = node("Add", [h, "h0_positions"], ["h0_placed"])[0]
    resid, pending = h, None  # residual stream; the last sublayer's output not yet added to it
    gb.io("input_ids", "INT64", ["batch", "seq"])
    gb.io("attention_mask", "INT64", ["batch", "total"])
    gb.io("logits", "FLOAT", ["batch", "seq", cfg.vocab_size], output=True)

    def norm(module: nn.Module, name: str) -> str:
        """The norm of the residual stream, first adding the pending sublayer output to it (one kernel)."""
        nonlocal resid, pending
        if pending is None:
            return plain_norm(resid, module, name)
        out, resid = gb.skip_norm(resid, pending, module, name)
        pending = None
        return out

    def head_norm(x: str, module: nn.Module, heads: int, name: str) -> str:
        """RMSNorm of each head of x (batch, seq, heads * hd): over a (batch, seq, heads, hd) view."""
        node("Reshape", [x, const(f"heads_{heads}", np.array([0, 0, heads, hd], np.int64))], [f"{name}_in"])
        plain_norm(f"{name}_in", module, f"{name}_h")
        return node("Reshape", [f"{name}_h_out", const(f"flat_{heads}", np.array([0, 0, heads * hd], np.int64))],
                    [f"{name}_out"])[0]

    def gated_mlp(x: str, mlp: nn.Module, p: str) -> str:
        """down(act(gate(x)) * up(x)); Phi-3: one gate_up_proj, split; an expert: its checkpoint's names."""
        names = getattr(mlp, "names", ("gate_proj", "up_proj", "down_proj"))  # (an expert: e.g. w1, w3, w2)
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: rows [gate; up]
            gu = linear(x, mlp.gate_up_proj, f"{p}.gate_up_proj")
            g, u = node("Split", [gu, const("split_gate_up", np.array([I, I], np.int64))], [f"{p}.gate", f"{p}.up"],
                        axis=-1)
        else:
            g, u = (linear(x, getattr(mlp, n), f"{p}.{n}") for n in names[:2])
        node("Mul", [gb.activation(g, act, f"{p}.gate"), u], [f"{p}.act"])
        return linear(f"{p}.act", getattr(mlp, names[2]), f"{p}.{names[2]}")

    def moe(x: str, block: nn.Module, p: str) -> str:
        """A mixture-of-experts MLP (Qwen3-MoE, Mixtral): the router's softmax over experts, its top k (their
        weights renormalised to sum 1 where the model does), then each expert on the rows routed to it only,
        its output weighted and added back into those rows (ScatterND), as transformers' experts loop does."""
        gate = block.gate
        node("Reshape", [x, const("moe.rows", np.array([-1, H], np.int64))], [f"{p}.rows"])
        node("MatMul", [f"{p}.rows", init(f"{p}.gate.weight_t", f32(gate.weight).T)], [f"{p}.router_logits"])
        node("Softmax", [f"{p}.router_logits"], [f"{p}.probs"], axis=-1)
        node("TopK", [f"{p}.probs", const(f"moe.top_{gate.top_k}", np.array([gate.top_k], np.int64))],
             [f"{p}.top", f"{p}.top_idx"], axis=-1)
        top = f"{p}.top"
        if router_renormalises(gate):
            node("ReduceSum", [top, const("axes_last", np.array([-1], np.int64))], [f"{p}.top_sum"], keepdims=1)
            top = node("Div", [top, f"{p}.top_sum"], [f"{p}.top_w"])[0]
        node("Shape", [f"{p}.probs"], [f"{p}.probs_shape"])
        node("ConstantOfShape", [f"{p}.probs_shape"], [f"{p}.zeros_e"])  # (tokens, experts) of float zeros
        node("ScatterElements", [f"{p}.zeros_e", f"{p}.top_idx", top], [f"{p}.weights"], axis=1)
        node("Shape", [f"{p}.rows"], [f"{p}.rows_shape"])
        acc = node("ConstantOfShape", [f"{p}.rows_shape"], [f"{p}.acc"])[0]
        for e, expert in enumerate(block.experts):
            q = f"{p}.experts.{e}"
            node("Gather", [f"{p}.weights", const(f"moe.expert_{e}", np.array(e, np.int64))], [f"{q}.w"], axis=1)
            node("Greater", [f"{q}.w", const("moe.zero", np.array(0, np.float32))], [f"{q}.hit"])
            node("NonZero", [f"{q}.hit"], [f"{q}.nz"])  # (1, routed)
            node("Transpose", [f"{q}.nz"], [f"{q}.idx"], perm=[1, 0])  # (routed, 1): ScatterND's row indices
            node("Reshape", [f"{q}.nz", const("moe.flat", np.array([-1], np.int64))], [f"{q}.tokens"])
            node("Gather", [f"{p}.rows", f"{q}.tokens"], [f"{q}.x"], axis=0)
            y = gated_mlp(f"{q}.x", expert, q)
            node("Gather", [f"{q}.w", f"{q}.tokens"], [f"{q}.wt"], axis=0)
            node("Unsqueeze", [f"{q}.wt", const("axes_last", np.array([-1], np.int64))], [f"{q}.wt_col"])
            node("Mul", [y, f"{q}.wt_col"], [f"{q}.y"])
            acc = node("ScatterND", [acc, f"{q}.idx", f"{q}.y"], [f"{q}.acc"], reduction="add")[0]
        node("Shape", [x], [f"{p}.x_shape"])
        return node("Reshape", [acc, f"{p}.x_shape"], [f"{p}.out"])[0]

    for i, layer in enumerate(base.layers):
        p = f"model.layers.{i}"
        x = norm(part(layer, "input_layernorm", "self_attn_layer_norm"), f"{p}.input_layernorm")
        att = part(layer, "self_attn", "attention")
        if hasattr(att, "query_key_value"):  # GPT-NeoX: per head [q; k; v] rows
            qkv = linear(x, att.query_key_value, f"{p}.attention.query_key_value")
            node("Reshape", [qkv, const("heads_3", np.array([0, 0, nh, 3, hd], np.int64))], [f"{p}.qkv_h"])
            parts = node("Split", [f"{p}.qkv_h"], [f"{p}.{t}_h" for t in "qkv"], axis=3, num_outputs=3)
            q, k, v = (node("Reshape", [t, const("flat_h", np.array([0, 0, H], np.int64))], [f"{t}_flat"])[0]
                       for t in parts)
        elif hasattr(att, "qkv_proj"):  # Phi-3: rows [q; k; v]
            qkv = linear(x, att.qkv_proj, f"{p}.self_attn.qkv_proj")
            q, k, v = node("Split", [qkv, const("split_qkv", np.array([nh * hd, nkv * hd, nkv * hd], np.int64))],
                           [f"{p}.self_attn.q", f"{p}.self_attn.k", f"{p}.self_attn.v"], axis=-1)
        else:
            q = linear(x, att.q_proj, f"{p}.self_attn.q_proj")
            k = linear(x, att.k_proj, f"{p}.self_attn.k_proj")
            v = linear(x, att.v_proj, f"{p}.self_attn.v_proj")
        if hasattr(att, "q_norm"):  # Qwen3: RMSNorm over each head's dims, before the rotary embedding
            q = head_norm(q, att.q_norm, nh, f"{p}.self_attn.q_norm")
            k = head_norm(k, att.k_norm, nkv, f"{p}.self_attn.k_norm")
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        ok, ov = f"present.{i}.key", f"present.{i}.value"
        window = getattr(att, "sliding_window", getattr(cfg, "sliding_window", None)) or -1  # (Mistral: all layers)
        cos, sin = caches[getattr(att, "layer_type", None) if None not in caches else None] if caches else ("", "")
        if partial:  # rotate the first rd dimensions of each head here; the attention then rotates nothing
            q, k = (node("RotaryEmbedding", [t, "past_len_1d", cos, sin], [f"{t}_rot"], "com.microsoft",
                         num_heads=n, rotary_embedding_dim=rd, interleaved=0)[0] for t, n in ((q, nh), (k, nkv)))
            cos, sin = "", ""
        node("GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_len", cos, sin],
             [f"{p}.attn_out", ok, ov], "com.microsoft", num_heads=nh, kv_num_heads=nkv, do_rotary=int(bool(cos)),
             rotary_interleaved=0, local_window_size=window,  # (HF and ORT count the token itself alike)
             scale=float(att.scaling), softcap=float(getattr(att, "attn_logit_softcapping", None) or 0.0))
        for name in (pk, pv):
            gb.io(name, "FLOAT", ["batch", nkv, "past", hd])
        for name in (ok, ov):
            gb.io(name, "FLOAT", ["batch", nkv, "total", hd], output=True)
        pending = linear(f"{p}.attn_out", part(att, "o_proj", "out_proj", "dense"), f"{p}.self_attn.o_proj")
        if getattr(layer, "use_parallel_residual", False):  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            y = plain_norm(resid, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            a = gb.activation(linear(y, layer.mlp.dense_h_to_4h, f"{p}.mlp.up"), act, f"{p}.mlp")
            m = linear(a, layer.mlp.dense_4h_to_h, f"{p}.mlp.down")
            pending = node("Add", [pending, m], [f"{p}.attn_mlp"])[0]
            continue
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: a norm after each sublayer and before the MLP
            pending = plain_norm(pending, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            x = norm(layer.pre_feedforward_layernorm, f"{p}.pre_feedforward_layernorm")
        else:
            x = norm(part(layer, "post_attention_layernorm", "final_layer_norm"), f"{p}.post_attention_layernorm")
        if hasattr(layer, "fc1"):  # OPT: fc2(relu(fc1(x)))
            node("Relu", [linear(x, layer.fc1, f"{p}.fc1")], [f"{p}.relu"])
            pending = linear(f"{p}.relu", layer.fc2, f"{p}.fc2")
            continue
        mlp = layer.mlp
        pending = moe(x, mlp, f"{p}.mlp") if isinstance(getattr(mlp, "experts", None), Experts) else \
            gated_mlp(x, mlp, f"{p}.mlp")
        if hasattr(layer, "post_feedforward_layernorm"):
            pending = plain_norm(pending, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm")
    x = norm(part(base, "norm", "final_layer_norm"), "model.norm")  # (GPT-NeoX's is final_layer_norm too)
    head = gb.output_layer(x, model.get_output_embeddings(), embed, "lm_head")
    if cap := getattr(cfg, "final_logit_softcapping", None):  # Gemma 2: cap * tanh(logits / cap)
        node("Div", [head, const("final_softcap", np.array(cap, np.float32))], ["logits_scaled"])
        node("Tanh", ["logits_scaled"], ["logits_tanh"])
        head = node("Mul", ["logits_tanh", "final_softcap"], ["logits_capped"])[0]
    node("Identity", [head], ["logits"])
    return gb.model("compress-fused-decoder"), gb.used
