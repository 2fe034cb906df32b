"""ONNX Runtime's MatMulNBits layout of a packed Linear: 2/4/8-bit codes in blocks along the input, with scales
and zero points per block (com.microsoft.MatMulNBits, https://github.com/microsoft/onnxruntime/blob/main/docs/
ContribOperators.md), as the fused ONNX graph (`export.onnx_fused`) writes it."""

from __future__ import annotations

from typing import Any

import numpy as np

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
