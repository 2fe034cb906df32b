"""ONNX Runtime's MatMulNBits layout of a packed Linear: 2/4/8-bit codes in blocks along the input, with scales
and zero points per block (com.microsoft.MatMulNBits, https://github.com/microsoft/onnxruntime/blob/main/docs/
ContribOperators.md), and the rewrite of an exported graph's float MatMuls into it. Shared by both ONNX graph
builders (`export.onnx`, `export.onnx_fused`)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

ORT_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # our bits -> the MatMulNBits width that holds them exactly
MAX_BLOCK = 256


def block_size_for(group: int) -> int:
    """The largest power of two <= 256 dividing `group` (>= 16, else the layout cannot be held)."""
    b = group & -group  # lowest set bit: the largest power-of-two divisor
    b = min(b, MAX_BLOCK)
    if b < 16:
        raise ValueError(f"group size {group} cannot be written as MatMulNBits blocks "
                         "(needs a power-of-two divisor >= 16); quantize with a group size such as 32, 64 or 128")
    return b


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (..., n) with n a multiple of 8 // bits into uint8, low bits first."""
    per = 8 // bits
    q = q.astype(np.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = np.zeros(q.shape[:-1], np.uint8)
    for j in range(per):
        out |= q[..., j] << np.uint8(bits * j)
    return out


def matmulnbits_tensors(m, float_dtype: np.dtype) -> dict[str, Any]:
    """B, scales and (if needed) zero points of one QuantLinear in MatMulNBits' layout, and the node attributes."""
    s = m.scheme
    N, K = m.out_features, m.in_features
    bits = ORT_BITS[s.bits]
    group = s.group_len(K)
    bs = block_size_for(group)
    nb = -(-K // bs)
    codes = m.codes().cpu().numpy().astype(np.uint8)  # (N, K) in [0, 2^s.bits)
    group_of_block = (np.arange(nb) * bs) // group  # each block lies inside one group
    scales = m.weight_scale.float().cpu().numpy()[:, group_of_block].astype(float_dtype)  # (N, nb)
    zero = m.zero_point().cpu().numpy()[:, group_of_block]  # (N, nb), integers as float
    padded = np.zeros((N, nb * bs), np.uint8)
    padded[:, :K] = codes
    B = pack_bits(padded.reshape(N, nb, bs), bits)  # (N, nb, bs * bits / 8)
    out: dict[str, Any] = {"B": B, "scales": scales, "K": K, "N": N, "bits": bits, "block_size": bs}
    if not (s.symmetric and bits == s.bits):  # else every zero is MatMulNBits' default 2^(bits-1)
        per = 8 // bits
        zp = np.full((N, -(-nb // per) * per), 2 ** (bits - 1), np.uint8)
        zp[:, :nb] = zero.astype(np.uint8)
        out["zero_points"] = pack_bits(zp, bits)  # (N, ceil(nb * bits / 8))
    return out


def _weight_key(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() + str(arr.shape)


def replace_matmuls(model_proto, quant: dict[str, Any], *, accuracy_level: int = 0) -> dict[str, int]:
    """Swap the float MatMul of every QuantLinear in `model_proto` for MatMulNBits; returns counts by bits."""
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    by_key: dict[str, tuple[str, bool]] = {}  # weight bytes -> (module, stored transposed)
    for name, m in quant.items():
        w = m.dequantize_weight().to(torch.float32)
        by_key[_weight_key(w.T.contiguous().numpy())] = (name, True)  # MatMul: (K, N)
        by_key[_weight_key(w.contiguous().numpy())] = (name, False)  # Gemm with transB=1: (N, K)
    used: dict[int, int] = {}
    done: set[str] = set()
    new_nodes = []
    for node in graph.node:
        found = _quantized_weight(node, inits, by_key)
        if found is None:  # a float MatMul (lm_head, ignored layers) or anything else
            new_nodes.append(node)
            continue
        name, bias = found
        t = matmulnbits_tensors(quant[name], np.float32)
        base = name.replace(".", "_")
        graph.initializer.append(numpy_helper.from_array(t["B"], f"{base}_Q{t['bits']}"))
        graph.initializer.append(numpy_helper.from_array(t["scales"], f"{base}_scales"))
        inputs = [node.input[0], f"{base}_Q{t['bits']}", f"{base}_scales", ""]
        if "zero_points" in t:
            graph.initializer.append(numpy_helper.from_array(t["zero_points"], f"{base}_zero_points"))
            inputs[3] = f"{base}_zero_points"
        if not inputs[-1]:
            inputs.pop()
        # a Gemm's bias becomes an Add after the node (Gemm's broadcasting; ONNX Runtime fuses it back)
        out = [f"{base}_MatMulNBits_output"] if bias else list(node.output)
        new_nodes.append(helper.make_node(
            "MatMulNBits", inputs, out, name=f"{base}_MatMulNBits", domain="com.microsoft",
            K=t["K"], N=t["N"], bits=t["bits"], block_size=t["block_size"], accuracy_level=accuracy_level))
        if bias:
            new_nodes.append(helper.make_node("Add", [out[0], bias], list(node.output), name=f"{base}_bias"))
        done.add(name)
        used[t["bits"]] = used.get(t["bits"], 0) + 1
    missing = sorted(set(quant) - done)
    if missing:
        raise ValueError(f"ONNX export: no MatMul found for quantized module(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; the exporter changed their weights")
    del graph.node[:]
    graph.node.extend(new_nodes)
    # drop the float weights nothing reads any more
    read = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return used


def _quantized_weight(node, inits, by_key) -> tuple[str, str | None] | None:
    """(module, Gemm bias input or None) when `node` multiplies by a quantized module's weight, else None."""
    import onnx
    from onnx import helper, numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    init = inits[node.input[1]]
    if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
        return None
    hit = by_key.get(_weight_key(numpy_helper.to_array(init)))
    if hit is None:
        return None
    name, transposed = hit
    if node.op_type == "MatMul":
        return (name, None) if transposed else None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
    if not plain or bool(attrs.get("transB", 0)) == transposed:  # Gemm computes A @ B^T only with transB=1
        return None
    return name, (node.input[2] if len(node.input) > 2 and node.input[2] else None)
