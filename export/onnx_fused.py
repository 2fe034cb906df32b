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

from typing import Any

import numpy as np
import torch
from torch import nn

from export.fused_arch import activation, fused_supported, norm_offset, rope_thetas, rotary_fraction


def part(module: nn.Module, *names: str) -> nn.Module:
    """The first of `names` that `module` has (Llama's name first, then OPT's or GPT-NeoX's)."""
    return getattr(module, next(n for n in names if hasattr(module, n)))


def build_fused_graph(model: nn.Module, *, accuracy_level: int = 0):
    """The ModelProto of `model` (float Linears and QuantLinears) as a fused decoder graph; counts by bits."""
    from onnx import TensorProto, helper, numpy_helper

    from compress.quantize.qlinear import QuantLinear
    from compress.quantize.w8a8linear import W8A8Linear
    from export.matmulnbits import matmulnbits_tensors

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
    nodes: list[Any] = []
    inits: list[Any] = []
    used: dict[int, int] = {}

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    consts: set[str] = set()

    def const(name: str, arr: np.ndarray) -> str:
        """A scalar constant every node that needs it shares (one initializer, not one per Linear)."""
        if name not in consts:
            consts.add(name)
            init(name, arr)
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))
        return outputs

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def linear(x: str, mod: nn.Module, name: str) -> str:
        """x @ W^T (+ b) for a Linear or QuantLinear, named after the module."""
        out = f"{name}_out"
        if isinstance(mod, QuantLinear):
            t = matmulnbits_tensors(mod, np.float32)
            ins = [x, init(f"{name}.qweight", t["B"]), init(f"{name}.scales", t["scales"])]
            if "zero_points" in t:
                ins.append(init(f"{name}.zero_points", t["zero_points"]))
            node("MatMulNBits", ins, [out if mod.bias is None else f"{name}_mm"], "com.microsoft", K=t["K"],
                 N=t["N"], bits=t["bits"], block_size=t["block_size"], accuracy_level=accuracy_level)
            used[t["bits"]] = used.get(t["bits"], 0) + 1
        elif isinstance(mod, W8A8Linear):
            int8_linear(x, mod, name, out)  # counted by the exporter (W8A8Linear modules), not in `used`
            return out
        elif isinstance(mod, nn.Linear):
            node("MatMul", [x, init(f"{name}.weight_t", f32(mod.weight).T)],
                 [out if mod.bias is None else f"{name}_mm"])
        else:
            raise ValueError(f"{name}: expected a Linear or QuantLinear, found {type(mod).__name__}")
        if mod.bias is not None:
            node("Add", [f"{name}_mm", init(f"{name}.bias", f32(mod.bias))], [out])
        return out

    quantized: dict[tuple, tuple[str, str, str]] = {}  # (input, grid) -> (uint8 codes, scale, zero point)

    def quantize_input(x: str, mod: nn.Module, name: str) -> tuple[str, str, str]:
        """uint8 codes of x on `mod`'s activation grid: the int8 grid shifted by 128 (the same integers - z)."""
        if mod.activations == "static":
            s, z = float(mod.input_scale), int(mod.input_zero_point)
            key = (x, s, z)
            if key not in quantized:
                sn = init(f"{name}.input_scale", np.array(s, np.float32))
                zn = init(f"{name}.input_zero_point", np.array(z + 128, np.uint8))
                quantized[key] = (node("QuantizeLinear", [x, sn, zn], [f"{name}.input_q"])[0], sn, zn)
            return quantized[key]
        key = (x, "dynamic")
        if key not in quantized:  # symmetric per token: s = max|x| / 127 per row, as W8A8Linear.quantize_input
            node("Abs", [x], [f"{name}.abs"])
            node("ReduceMax", [f"{name}.abs"], [f"{name}.amax"], axes=[-1], keepdims=1)
            node("Div", [f"{name}.amax", const("w8a8.qmax", np.array(127, np.float32))], [f"{name}.s0"])
            node("Max", [f"{name}.s0", const("w8a8.tiny", np.array(1e-12, np.float32))], [f"{name}.scale"])
            node("Div", [x, f"{name}.scale"], [f"{name}.xs"])
            node("Round", [f"{name}.xs"], [f"{name}.r"])
            node("Add", [f"{name}.r", const("w8a8.shift", np.array(128, np.float32))], [f"{name}.ru"])
            node("Clip", [f"{name}.ru", const("w8a8.lo", np.array(0, np.float32)),
                          const("w8a8.hi", np.array(255, np.float32))], [f"{name}.rc"])
            node("Cast", [f"{name}.rc"], [f"{name}.input_q"], to=TensorProto.UINT8)
            quantized[key] = (f"{name}.input_q", f"{name}.scale", const("w8a8.zero_point_128", np.array(128, np.uint8)))
        return quantized[key]

    def int8_linear(x: str, mod: nn.Module, name: str, out: str) -> None:
        xq, s, z = quantize_input(x, mod, name)
        # (in, out) uint8 = int8 + 128 with zero point 128: the same products, but ONNX Runtime's u8 x s8 kernels
        # on x86 without VNNI (vpmaddubsw) saturate pairs of products at int16 (logits off by > 1 on the tests'
        # tiny model on an AVX2 machine); its u8 x u8 kernels are exact everywhere
        w = init(f"{name}.weight_q", (mod.weight.cpu().numpy().T.astype(np.int16) + 128).astype(np.uint8))
        wz = const("w8a8.zero_point_128", np.array(128, np.uint8))
        w_scale = init(f"{name}.weight_scale", f32(mod.weight_scale).reshape(-1))  # (out,)
        bias = [init(f"{name}.bias", f32(mod.bias))] if mod.bias is not None else []
        if mod.activations == "static":
            node("MatMulIntegerToFloat", [xq, w, s, w_scale, z, wz, *bias], [out], "com.microsoft")
            return
        node("MatMulInteger", [xq, w, z, wz], [f"{name}.acc"])
        node("Cast", [f"{name}.acc"], [f"{name}.accf"], to=TensorProto.FLOAT)
        node("Mul", [f"{name}.accf", s], [f"{name}.rows"])
        node("Mul", [f"{name}.rows", w_scale], [out if not bias else f"{name}.mm"])
        if bias:
            node("Add", [f"{name}.mm", bias[0]], [out])

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
    graph_inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])]

    def norm_params(module: nn.Module, name: str) -> tuple[list[str], float, bool]:
        """(weight[, bias] initializers, epsilon, whether it is a LayerNorm (OPT) rather than an RMSNorm)."""
        if isinstance(module, nn.LayerNorm):
            return [init(f"{name}.weight", f32(module.weight)), init(f"{name}.bias", f32(module.bias))], \
                float(module.eps), True
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", None)))
        return [init(f"{name}.weight", f32(module.weight) + norm_offset(module))], eps, False  # Gemma: (1 + w)

    def norm(module: nn.Module, name: str) -> str:
        """The norm of the residual stream, first adding the pending sublayer output to it (one kernel)."""
        nonlocal resid, pending
        if pending is None:
            return plain_norm(resid, module, name)
        params, eps, layer_norm = norm_params(module, name)
        op = "SkipLayerNormalization" if layer_norm else "SkipSimplifiedLayerNormalization"
        out = node(op, [resid, pending, *params], [f"{name}_out", "", "", f"{name}_resid"], "com.microsoft",
                   epsilon=eps)
        resid, pending = out[3], None
        return out[0]

    def plain_norm(x: str, module: nn.Module, name: str) -> str:
        """The norm of one tensor (the first block's input; Gemma's post-norms of a sublayer's output)."""
        params, eps, layer_norm = norm_params(module, name)
        op = "LayerNormalization" if layer_norm else "SimplifiedLayerNormalization"
        return node(op, [x, *params], [f"{name}_out"], axis=-1, epsilon=eps, stash_type=1)[0]

    def head_norm(x: str, module: nn.Module, heads: int, name: str) -> str:
        """RMSNorm of each head of x (batch, seq, heads * hd): over a (batch, seq, heads, hd) view."""
        node("Reshape", [x, const(f"heads_{heads}", np.array([0, 0, heads, hd], np.int64))], [f"{name}_in"])
        plain_norm(f"{name}_in", module, f"{name}_h")
        return node("Reshape", [f"{name}_h_out", const(f"flat_{heads}", np.array([0, 0, heads * hd], np.int64))],
                    [f"{name}_out"])[0]

    for i, layer in enumerate(base.layers):
        p = f"model.layers.{i}"
        x = norm(part(layer, "input_layernorm", "self_attn_layer_norm"), f"{p}.input_layernorm")
        att = part(layer, "self_attn", "attention")
        if hasattr(att, "query_key_value"):  # GPT-NeoX: per head [q; k; v] rows
            qkv = linear(x, att.query_key_value, f"{p}.attention.query_key_value")
            node("Reshape", [qkv, const("heads_3", np.array([0, 0, nh, 3, hd], np.int64))], [f"{p}.qkv_h"])
            parts = node("Split", [f"{p}.qkv_h"], [f"{p}.{t}_h" for t in "qkv"], axis=3)
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
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", nkv, "past", hd]))
        for name in (ok, ov):
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", nkv, "total", hd]))
        pending = linear(f"{p}.attn_out", part(att, "o_proj", "out_proj", "dense"), f"{p}.self_attn.o_proj")
        if getattr(layer, "use_parallel_residual", False):  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            y = plain_norm(resid, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
            node("Gelu" if act == "gelu" else "FastGelu", [linear(y, layer.mlp.dense_h_to_4h, f"{p}.mlp.up")],
                 [f"{p}.mlp.act"], "com.microsoft")
            m = linear(f"{p}.mlp.act", layer.mlp.dense_4h_to_h, f"{p}.mlp.down")
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
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: rows [gate; up]
            gu = linear(x, mlp.gate_up_proj, f"{p}.mlp.gate_up_proj")
            g, u = node("Split", [gu, const("split_gate_up", np.array([I, I], np.int64))],
                        [f"{p}.mlp.gate", f"{p}.mlp.up"], axis=-1)
        else:
            g = linear(x, mlp.gate_proj, f"{p}.mlp.gate_proj")
            u = linear(x, mlp.up_proj, f"{p}.mlp.up_proj")
        if act == "silu":
            node("Sigmoid", [g], [f"{p}.mlp.sig"])
            node("Mul", [g, f"{p}.mlp.sig"], [f"{p}.mlp.g"])
        else:  # gelu with the tanh approximation (Gemma): ONNX Runtime's FastGelu is that formula
            node("FastGelu", [g], [f"{p}.mlp.g"], "com.microsoft")
        node("Mul", [f"{p}.mlp.g", u], [f"{p}.mlp.act"])
        pending = linear(f"{p}.mlp.act", mlp.down_proj, f"{p}.mlp.down_proj")
        if hasattr(layer, "post_feedforward_layernorm"):
            pending = plain_norm(pending, layer.post_feedforward_layernorm, f"{p}.post_feedforward_layernorm")
    x = norm(part(base, "norm", "final_layer_norm"), "model.norm")  # (GPT-NeoX's is final_layer_norm too)
    out_emb = model.get_output_embeddings()
    if isinstance(out_emb, nn.Linear) and out_emb.bias is None and \
            out_emb.weight.data_ptr() == embed.weight.data_ptr():
        # tied float head: one copy of the matrix in the file, transposed when the session is created
        node("Transpose", ["embed_tokens"], ["embed_tokens_t"], perm=[1, 0])
        head = node("MatMul", [x, "embed_tokens_t"], ["lm_head_out"])[0]
    else:
        head = linear(x, out_emb, "lm_head")
    if cap := getattr(cfg, "final_logit_softcapping", None):  # Gemma 2: cap * tanh(logits / cap)
        node("Div", [head, const("final_softcap", np.array(cap, np.float32))], ["logits_scaled"])
        node("Tanh", ["logits_scaled"], ["logits_tanh"])
        head = node("Mul", ["logits_tanh", "final_softcap"], ["logits_capped"])[0]
    nodes.append(helper.make_node("Identity", [head], ["logits"], name="logits"))
    graph = helper.make_graph(nodes, "compress-fused-decoder", graph_inputs, graph_outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="compress")
    return proto, used
