"""The integer weight format shared by every weight quantizer (RTN, GPTQ, AWQ, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from calibrate.forward import ForwardOptions
from compress import targets as tg

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_STORED_GROUP = 8  # below this a non-dividing group size would cost >= 2 extra bits per weight in repeated scales
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """How one weight matrix is stored: bits, group size along the input dim, symmetry.

    Codes are kept unsigned in [0, 2^bits - 1] with a per-group zero point, so
    dequantization is always `(q - zero) * scale`. Symmetric schemes have the
    fixed zero 2^(bits-1) (codes are the signed values offset by it) and store
    no zero point.
    """

    bits: Literal[SUPPORTED_BITS] = 4  # stored bits per weight
    group_size: int = 128  # input columns per scale; -1 = one group per output row
    symmetric: bool = True  # a grid centred on zero (no zero point stored), or asymmetric with zero points
    scale_dtype: Literal[tuple(SCALE_DTYPES)] = "float16"  # dtype the scales are stored (and rounded) in

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return -(-in_features // g)  # ceil: the last group is shorter when g does not divide

    def stored(self, in_features: int) -> QuantScheme:
        """The scheme a row of `in_features` is stored with: this one, or, when the group size does not
        divide the row, groups of gcd(group, in_features) repeating each scale and zero point (the same
        weights: compressed-tensors and vLLM need groups that divide the row)."""
        g = self.group_len(in_features)
        if in_features % g == 0:
            return self
        stored = math.gcd(g, in_features)
        if stored < MIN_STORED_GROUP:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f"e.g. {', '.join(map(str, divisors))} or -1" if divisors else "-1 (per output channel)"
            raise ValueError(f"group size {g} does not divide the input width {in_features}; it could only be stored "
                             f"as groups of gcd({g}, {in_features}) = {stored}, one scale per {stored} weights "
                             f"({self.bits} + {16 // stored} bits per weight); use a group size that divides "
                             f"{in_features}: {hint}")
        return QuantScheme(**{**self.to_dict(), "group_size": stored})

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": self.scale_dtype}


@dataclass(frozen=True, kw_only=True)
class WeightQuantConfig(tg.Selection, QuantScheme):
    """Fields every weight-quantization pass shares: the scheme plus module selection."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse, before any work, a group size that a selected Linear could not store (see `stored`)."""
        for name, lin in tg.select(model, self.targets, self.ignore, kinds=(nn.Linear,)).items():
            try:
                self.stored(lin.in_features)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                           scale_dtype=self.scale_dtype)


@dataclass(frozen=True, kw_only=True)
class CalibratedQuantConfig(ForwardOptions, WeightQuantConfig):
    """Fields of the weight quantizers that run calibration data through the blocks (GPTQ, AWQ, mixed)."""
