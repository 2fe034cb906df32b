"""Our packed weights as GGUF blocks (Q8_0, Q4_0, Q4_1) and float tensors, exactly (see `export.gguf`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32  # weights per block of every type written here


@dataclass
class Encoded:
    """One tensor as written: GGML type name, block bytes (or float array), and the float it must decode to."""

    kind: str  # "Q8_0" | "Q4_0" | "Q4_1" | "F32" | "F16"
    data: np.ndarray
    expect: np.ndarray  # float32, what the tensor means (rows in file order)
    requant_error: float | None = None  # max |w' - w| when re-quantized with requantize=True


def _fp16_exact(x: np.ndarray) -> bool:
    """True when every value of float32 `x` is an fp16 number (finite, not rounded)."""
    h = x.astype(np.float16)
    return bool(np.all(np.isfinite(h)) and np.array_equal(h.astype(np.float32), x))


def _blocks_per_row(scale: np.ndarray, group: int, n_in: int) -> np.ndarray:
    """Per-group values (N, n_groups) -> per-block values (N, n_in / 32); each block lies inside one group."""
    group_of_block = (np.arange(n_in // BLOCK) * BLOCK) // group
    return scale[:, group_of_block]


def pack_q8_0(c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """int8 codes (N, K), fp16 scales (N, K/32) -> Q8_0 bytes (N, K/32 * 34): per block d, then 32 codes."""
    N, K = c.shape
    nb = K // BLOCK
    d_bytes = np.ascontiguousarray(d, dtype="<f2").view(np.uint8).reshape(N, nb, 2)
    c_bytes = np.ascontiguousarray(c, dtype=np.int8).view(np.uint8).reshape(N, nb, BLOCK)
    return np.concatenate([d_bytes, c_bytes], axis=-1).reshape(N, -1)


def pack_q4(c: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """4-bit codes (N, K) in [0, 15], fp16 d (and m) (N, K/32) -> Q4_0 (18 B/block) or Q4_1 (20 B/block) bytes.

    In a block's 16 code bytes, byte j holds weight j in its low nibble and weight j + 16 in its high one.
    """
    N, K = c.shape
    nb = K // BLOCK
    c = c.astype(np.uint8).reshape(N, nb, BLOCK)
    nibbles = c[..., :16] | (c[..., 16:] << np.uint8(4))  # (N, nb, 16)
    parts = [np.ascontiguousarray(d, dtype="<f2").view(np.uint8).reshape(N, nb, 2)]
    if m is not None:
        parts.append(np.ascontiguousarray(m, dtype="<f2").view(np.uint8).reshape(N, nb, 2))
    parts.append(nibbles)
    return np.concatenate(parts, axis=-1).reshape(N, -1)


def encode_quant(m, name: str, *, requantize: bool = False) -> Encoded:
    """A QuantLinear's weight as Q8_0 / Q4_0 / Q4_1 blocks holding its own numbers (see the module docstring)."""
    s = m.scheme
    K = m.in_features
    W = m.dequantize_weight().float().cpu().numpy()  # (N, K): the numbers the module multiplies by
    why = _inexact_reason(m)
    if why is not None:
        if not requantize:
            raise ValueError(f"{name}: {why}, so GGUF cannot hold its weights exactly; re-quantize it to "
                             "Q8_0/Q4_0 with requantize=True (CLI: --requantize) or quantize with "
                             "a GGUF-compatible layout (symmetric, group size a multiple of 32)")
        if K % BLOCK:
            raise ValueError(f"{name}: rows of {K} weights are not whole {BLOCK}-weight GGUF blocks")
        return _requantized(W, 8 if s.bits == 8 else 4)
    codes = m.codes().cpu().numpy()  # (N, K)
    group = s.group_len(K)
    scale = _blocks_per_row(m.weight_scale.float().cpu().numpy(), group, K).astype(np.float32)  # (N, nb)
    if s.symmetric and s.bits == 8:
        return Encoded("Q8_0", pack_q8_0(codes - 128, scale), W)
    if s.symmetric:
        return Encoded("Q4_0", pack_q4(codes + (8 - 2 ** (s.bits - 1)), scale), W)
    zero = _blocks_per_row(m.zero_point().cpu().numpy(), group, K)
    return Encoded("Q4_1", pack_q4(codes, scale, -zero * scale), W)


def _inexact_reason(m) -> str | None:
    """Why module `m`'s layout has no exact GGUF block form, or None when it has one."""
    s = m.scheme
    K = m.in_features
    group = s.group_len(K)
    if K % BLOCK or group % BLOCK:
        return f"its groups of {group} weights are not whole {BLOCK}-weight blocks"
    if not s.symmetric and s.bits == 8:
        return "asymmetric 8-bit has no GGUF block type (Q8_0 is symmetric)"
    scale = m.weight_scale.float().cpu().numpy()
    if not _fp16_exact(scale):
        return f"its {s.scale_dtype} scales are not all fp16 numbers"
    if not s.symmetric and not _fp16_exact(-m.zero_point().cpu().numpy() * scale):
        return "Q4_1 stores the offset -zero * scale in fp16, and some of its offsets are not fp16 numbers"
    return None


def _requantized(W: np.ndarray, bits: int) -> Encoded:
    """W (N, K) rounded again by our RTN to symmetric `bits` with 32-wide groups, as Q8_0 or Q4_0."""
    from compress.quantize.grid import dequantize, quantize_weight
    from compress.quantize.scheme import QuantScheme

    scheme = QuantScheme(bits=bits, group_size=BLOCK, symmetric=True, scale_dtype="float16")
    q, scale, zero = quantize_weight(torch.from_numpy(W), scheme)
    W2 = dequantize(q, scale, zero, scheme).numpy()
    err = float(np.abs(W2 - W).max())
    q, scale = q.numpy(), scale.numpy()
    if bits == 8:
        return Encoded("Q8_0", pack_q8_0(q - 128, scale), W2, err)
    return Encoded("Q4_0", pack_q4(q, scale), W2, err)


def encode_float(t: torch.Tensor, float_type: str) -> Encoded:
    """Float tensors: vectors (norms, biases) always F32, matrices in `float_type`."""
    a = t.detach().float().cpu().numpy()
    if a.ndim >= 2 and float_type == "f16":
        if not np.all(np.isfinite(a.astype(np.float16))):
            raise ValueError("a float tensor has values beyond fp16's range; export with float_type='f32'")
        return Encoded("F16", a.astype(np.float16), a.astype(np.float16).astype(np.float32))
    return Encoded("F32", a, a)
