"""Integer grids: per-group scales and zero points, quantize, dequantize.

Groups run along the input dimension (columns) of a (out, in) weight. When the
group size does not divide `in`, the last group is shorter: the weight is
zero-padded to whole groups, which changes neither the absolute maximum
(symmetric) nor the range (asymmetric, whose range always includes 0 so that
0 is exactly representable, as in GPTQ and compressed-tensors).

A symmetric grid uses all 2^bits codes, signed -2^(bits-1) .. 2^(bits-1) - 1, the way ggml's Q4_0 and Q8_0
do: each group's largest-magnitude weight lands exactly on the code -2^(bits-1), so the scale carries that
weight's sign (it is negative when the extreme weight is positive), and the other side reaches
(2^(bits-1) - 1) steps. The plain |max| / (2^(bits-1) - 1) leaves the code -2^(bits-1) unused: one level in
sixteen at 4 bits, a step 8/7 as coarse (reference model, RTN W4 g128: perplexity 40.18 there, 34.89 here;
bench/results/sym_grid.json).
"""

from __future__ import annotations

import torch

from compress.quantize.scheme import QuantScheme


def grouped(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g), zero-padded."""
    out, n_in = W.shape
    g, ng = scheme.group_len(n_in), scheme.n_groups(n_in)
    if ng * g != n_in:
        W = torch.nn.functional.pad(W, (0, ng * g - n_in))
    return W.reshape(out, ng, g)


def qparams(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group for weight W (out, in) -> two (out, n_groups) tensors.

    The scale is returned in float32 but already rounded to `scheme.scale_dtype`,
    so codes computed from it are the codes of the stored artifact. Zero points
    are float32 holding integers in [0, 2^bits - 1].
    """
    Wg = grouped(W.float(), scheme)  # (out, ng, g)
    if scheme.symmetric:
        half = 2 ** (scheme.bits - 1)
        extreme = Wg.gather(-1, Wg.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed, (out, ng)
        scale = extreme / -half  # the extreme weight's code is 0, i.e. signed -half
        zero = torch.full_like(scale, float(half))
    else:
        lo = Wg.amin(-1).clamp(max=0.0)
        hi = Wg.amax(-1).clamp(min=0.0)
        scale = (hi - lo) / scheme.qmax
        zero = None
    sd = scheme.torch_scale_dtype
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("the weight has non-finite values (NaN or inf); they cannot be quantized")
    if bool((scale.abs() > torch.finfo(sd).max).any()):  # clamping would store a wrong scale for the group
        raise ValueError(f"a weight group needs a scale of {float(scale.abs().max()):.4g}, beyond the largest "
                         f"{scheme.scale_dtype} ({torch.finfo(sd).max:.6g}); store scales as float32 "
                         "(--scale-dtype float32, scale_dtype: float32)")
    # All-zero groups give scale 0: any non-zero scale reproduces them exactly.
    tiny = torch.finfo(sd).tiny
    scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny).copysign(scale), scale).to(sd).float()
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, scheme.qmax)
    return scale, zero


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Unsigned integer codes (out, in), int32, in [0, 2^bits - 1]."""
    out, n_in = W.shape
    Wg = grouped(W.float(), scheme)  # (out, ng, g)
    q = torch.round(Wg / scale[..., None]) + zero[..., None]
    return q.clamp(0, scheme.qmax).reshape(out, -1)[:, :n_in].to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """(q - zero) * scale per group -> float32 (out, in)."""
    out, n_in = q.shape
    qg = grouped(q.float(), scheme)  # (out, ng, g)
    W = (qg - zero.float()[..., None]) * scale.float()[..., None]
    return W.reshape(out, -1)[:, :n_in]


def quantize_weight(W: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes, scale, zero) for W (out, in)."""
    scale, zero = qparams(W, scheme)
    return quantize(W, scale, zero, scheme), scale, zero


def fake_quantize(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize-dequantize in float32: the reference a packed module must reproduce."""
    q, scale, zero = quantize_weight(W, scheme)
    return dequantize(q, scale, zero, scheme)
