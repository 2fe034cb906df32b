"""W8A8Linear: int8 weights (per output channel) times int8 activations (static per tensor, or dynamic per token).

Buffers follow compressed-tensors' "int-quantized" naming, so the state dict
is the artifact's tensor layout:

- `weight`             int8 (out, in): symmetric codes in [-127, 127]
- `weight_scale`       float32 (out, 1)
- `input_scale`        float32 (1,)   static activations only
- `input_zero_point`   int8 (1,)      static activations only (0 when symmetric)

The product is y = s_x * s_w * ((q_x - z_x) @ q_w^T) + b: an integer matrix
product scaled once per output. Activations are rounded half to even and
saturated to [-128, 127], as ONNX's QuantizeLinear does, so the ONNX export
(QuantizeLinear + MatMulIntegerToFloat) computes the same numbers. The
integer product runs as `torch._int_mm` on CUDA; elsewhere it is evaluated
on the integer values in float32, exact while partial sums stay below 2^24
(and within float32 rounding beyond): PyTorch's CPU int8 matmul measured 40x
slower than float32 on the development machine, so the fast CPU path is the
ONNX export, whose integer kernels run it natively.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.quantize.packed import PackedLinear

QMIN, QMAX = -128, 127
ACTIVATIONS = ("static", "dynamic")


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """int8 codes of x on the grid (scale, zero): round half to even, saturate to [-128, 127]."""
    return (torch.round(x / scale) + zero).clamp(QMIN, QMAX).to(torch.int8)


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a (m, k) int8 @ b_t (k, n) int8 as float32 (exact integers, see the module docstring)."""
    m, k = a.shape
    if a.is_cuda and m > 16 and k % 8 == 0 and b_t.shape[1] % 8 == 0:
        return torch._int_mm(a, b_t).float()
    return a.float() @ b_t.float()


class W8A8Linear(PackedLinear):
    """A Linear running int8 x int8 with per-channel weight scales and static or per-token activation scales."""

    kind = "w8a8"

    def __init__(self, in_features: int, out_features: int, *, activations: str = "static", bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if activations == "static":
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
            self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.compute_dtype = dtype

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, *, activations: str = "static", input_scale: torch.Tensor | None = None,
                    input_zero_point: torch.Tensor | None = None) -> W8A8Linear:
        """Round `lin`'s weight per output channel (symmetric, max|w| / 127) and attach the activation grid."""
        W = lin.weight.detach().float()  # (out, in)
        scale = (W.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (out, 1)
        m = cls(lin.in_features, lin.out_features, activations=activations, bias=lin.bias is not None,
                dtype=lin.weight.dtype, device=lin.weight.device)
        m.weight.copy_(torch.round(W / scale).clamp(-127, 127).to(torch.int8))
        m.weight_scale.copy_(scale)
        if activations == "static":
            if input_scale is None:
                raise ValueError("static activations need an input scale (from calibration)")
            m.input_scale.copy_(input_scale.float().reshape(1))
            z = input_zero_point if input_zero_point is not None else torch.zeros(1)
            m.input_zero_point.copy_(z.reshape(1).round().clamp(QMIN, QMAX).to(torch.int8))
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach())
        return m

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) the integer codes stand for."""
        return self.weight.float() * self.weight_scale

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes int8 (tokens, in), scale (tokens, 1) or (1,), zero point) of x reshaped to (tokens, in)."""
        x = x.reshape(-1, self.in_features).float()
        if self.activations == "static":
            scale, zero = self.input_scale, self.input_zero_point.float()
        else:  # symmetric per token: each row's own max|x| / 127
            scale = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)  # (tokens, 1)
            zero = torch.zeros((), device=x.device)
        return quantize_activation(x, scale, zero), scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale, zero = self.quantize_input(x)
        acc = int_matmul(q, self.weight.T)  # (tokens, out): sum_k q_x q_w
        if self.activations == "static" and float(zero) != 0.0:
            # (q_x - z) @ q_w^T = q_x @ q_w^T - z * (row sums of q_w): the zero point costs one vector
            acc = acc - zero * self.weight.float().sum(1)
        y = acc * scale * self.weight_scale.T  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations={self.activations}, bias={self.bias is not None}")

    def storage_bits(self) -> int:
        """Bits on disk of the int8 weight and its scales (bias excluded)."""
        n = self.weight.numel() * 8 + self.weight_scale.numel() * 32
        if self.activations == "static":
            n += 32 + 8
        return n

    @classmethod
    def from_layout(cls, layout: dict, dtype: torch.dtype) -> W8A8Linear:
        return cls(layout["in_features"], layout["out_features"], activations=layout["activations"],
                   bias=layout.get("bias", False), dtype=dtype)

    def layout(self) -> dict:
        """What the loader needs to rebuild this module (recorded in the artifact's provenance)."""
        return {"kind": self.kind, "activations": self.activations, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}
