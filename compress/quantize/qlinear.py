"""QuantLinear: a Linear whose weight is stored packed (int32 words), with scales and zero points.

Buffers follow compressed-tensors' pack-quantized naming, so the state dict of
a quantized model is the artifact's tensor layout:

- `weight_packed`     int32 (out, ceil(in * bits / 32)): unsigned codes, see `packing`
- `weight_scale`      (out, n_groups) in the scheme's scale dtype
- `weight_zero_point` int32 (ceil(out * bits / 32), n_groups), asymmetric only:
                      unsigned zero points packed along the output dimension
- `weight_shape`      int64 (2,): (out, in)

Symmetric schemes store no zero point (it is 2^(bits-1)). The forward pass
dequantizes and runs a float matmul: on a CPU this module is for correctness
and evaluation; the fast CPU path is the ONNX (MatMulNBits) and GGUF export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from compress.quantize.grid import dequantize
from compress.quantize.packed import PackedLinear
from compress.quantize.packing import pack_int32, packed_len, unpack_int32, unpack_int32_sparse
from compress.quantize.scheme import QuantScheme


class QuantLinear(PackedLinear):
    """y = x @ dequant(W)^T + b with W held as packed integer codes."""

    kind = "quant"

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        ng = scheme.n_groups(in_features)
        self.register_buffer("weight_packed", torch.zeros(
            out_features, packed_len(in_features, scheme.bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(
            out_features, ng, dtype=scheme.torch_scale_dtype, device=device))
        if not scheme.symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(
                packed_len(out_features, scheme.bits), ng, dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor(
            [out_features, in_features], dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.compute_dtype = dtype
        self.dequantized: torch.Tensor | None = None  # set inside `dequantized_once`
        self.sparse_words = False  # set by from_layout for an artifact written before the dense layout

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an artifact from before the dense layout (3 bits: ten codes per word) is repacked as it loads, so the
        # module, and whatever is saved from it, holds compressed-tensors' layout
        if self.sparse_words:
            bits = self.scheme.bits
            for key, n, flip in ((prefix + "weight_packed", self.in_features, False),
                                 (prefix + "weight_zero_point", self.out_features, True)):
                t = state_dict.get(key)
                if t is not None and t.dtype == torch.int32:
                    t = t.T if flip else t
                    t = pack_int32(unpack_int32_sparse(t, bits, n), bits)
                    state_dict[key] = t.T.contiguous() if flip else t
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   scheme: QuantScheme, *, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> QuantLinear:
        """Build from unsigned codes q (out, in), scale and zero (out, n_groups).

        A group size that does not divide `in` is stored as `scheme.stored(in)`:
        smaller groups that repeat each scale and zero point (the same weights).
        """
        out, n_in = q.shape
        stored = scheme.stored(n_in)
        if stored is not scheme:
            idx = torch.arange(stored.n_groups(n_in), device=scale.device) * stored.group_size
            idx = torch.div(idx, scheme.group_len(n_in), rounding_mode="floor")
            scale, zero, scheme = scale[:, idx], zero[:, idx], stored
        m = cls(n_in, out, scheme, bias=bias is not None, dtype=dtype, device=q.device)
        m.weight_packed.copy_(pack_int32(q, scheme.bits))
        m.weight_scale.copy_(scale.to(scheme.torch_scale_dtype))
        if not scheme.symmetric:
            # (n_groups, out) packed along out, then back to (words_out, n_groups)
            m.weight_zero_point.copy_(pack_int32(zero.round().to(torch.int64).T, scheme.bits).T)
        elif not torch.all(zero == 2 ** (scheme.bits - 1)):
            raise ValueError("a symmetric scheme needs the zero point 2^(bits-1) in every group")
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(dtype))
        return m

    @classmethod
    def from_layout(cls, layout: dict, dtype: torch.dtype) -> QuantLinear:
        m = cls(layout["in_features"], layout["out_features"], QuantScheme(**layout["scheme"]),
                bias=layout.get("bias", False), dtype=dtype)
        m.sparse_words = 32 % m.scheme.bits != 0 and layout.get("packing") != "dense"
        return m

    def layout(self) -> dict:
        # no "kind": the default one, as artifacts recorded it before there were kinds; "packing" only where
        # the dense layout differs from the earlier one (widths that do not divide 32)
        return {"scheme": self.scheme.to_dict(), "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                **({"packing": "dense"} if 32 % self.scheme.bits else {})}

    def codes(self) -> torch.Tensor:
        """Unsigned codes (out, in), int32."""
        return unpack_int32(self.weight_packed, self.scheme.bits, self.in_features)

    def zero_point(self) -> torch.Tensor:
        """Zero points (out, n_groups) as float32."""
        if self.scheme.symmetric:
            return torch.full(self.weight_scale.shape, float(2 ** (self.scheme.bits - 1)),
                              device=self.weight_scale.device)
        return unpack_int32(self.weight_zero_point.T, self.scheme.bits, self.out_features).T.float()

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight (out, in) this module multiplies by."""
        return dequantize(self.codes(), self.weight_scale.float(), self.zero_point(), self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized if self.dequantized is not None else self.dequantize_weight()
        return F.linear(x, w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, symmetric={s.symmetric}, bias={self.bias is not None}")

    def storage_bits(self) -> int:
        """Bits on disk of the packed weight, scales and zero points (bias excluded)."""
        n = self.weight_packed.numel() * 32 + self.weight_scale.numel() * self.weight_scale.element_size() * 8
        if not self.scheme.symmetric:
            n += self.weight_zero_point.numel() * 32
        return n


class PendingSwaps:
    """Linears of one block already given their codes, swapped for QuantLinears when the block is done.

    While a block is calibrated and then run to feed the next one, its Linears
    hold the dequantized weights in float (the exact values a QuantLinear
    multiplies by, so outputs are identical) and skip unpacking the codes on
    every batch; `commit` then replaces them by the packed modules.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, nn.Linear, QuantLinear]] = []

    @torch.no_grad()
    def add(self, name: str, lin: nn.Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
            scheme: QuantScheme) -> None:
        # packed now: a block's int32 codes would take 8x the memory of its packed weights until commit
        qlin = QuantLinear.from_codes(q, scale, zero, scheme, bias=lin.bias, dtype=lin.weight.dtype)
        lin.weight.copy_(qlin.dequantize_weight().to(lin.weight.dtype))
        self._items.append((name, lin, qlin))

    def commit(self, parent: nn.Module) -> int:
        """Replace every pending Linear under `parent` by its QuantLinear; return their storage bits."""
        from compress.targets import set_submodule

        bits = 0
        for name, lin, qlin in self._items:
            set_submodule(parent, name, qlin)
            lin.to("meta")  # free the float weight now: callers may still hold the old module
            bits += qlin.storage_bits()
        self._items.clear()
        return bits


def _free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def dequantized_once(model: nn.Module, *, max_fraction: float = 0.5) -> Iterator[bool]:
    """Within the block, every QuantLinear of `model` multiplies by its weight dequantized once (float32)
    instead of unpacking the codes on every call: the same numbers, and repeated forwards (evaluation)
    no longer pay for the unpacking. Skipped, yielding False, when those float32 weights would take more
    than `max_fraction` of the free memory (or the free memory is unknown and they exceed 2 GiB)."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    need = sum(m.in_features * m.out_features * 4 for m in mods)
    free = _free_bytes(mods[0].weight_packed.device) if mods else None
    if not mods or need > (free * max_fraction if free is not None else 2**31):
        yield False
        return
    try:
        with torch.no_grad():
            for m in mods:
                m.dequantized = m.dequantize_weight()
        yield True
    finally:
        for m in mods:
            m.dequantized = None
