"""The dtype calibration forwards run in: bfloat16 autocast where the device multiplies it natively."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORWARD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class ForwardOptions:
    """The fields of every config whose pass runs calibration forwards (a base class; cooperates with others)."""

    batch_size: int = 8  # calibration samples per forward pass
    # calibration forwards: "auto" = bfloat16 autocast where the device has fast bf16, else float32
    forward_dtype: str = "auto"
    # a mixture-of-experts expert routed fewer calibration tokens than this is calibrated on all the layer's tokens
    min_expert_tokens: int = 64

    def __post_init__(self) -> None:
        if self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, got {self.forward_dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.min_expert_tokens < 0:
            raise ValueError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens}")
        getattr(super(), "__post_init__", lambda: None)()


def native_bf16(device_type: str) -> bool:
    """Whether the device multiplies bfloat16 natively: CUDA with bf16 support, a CPU with AVX512-BF16 or AMX."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_forward_dtype(name: str, param: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for calibration forwards of a model whose weights look like `param`; None: no autocast.

    "auto" picks bfloat16 for a float32 model where the device multiplies
    bfloat16 natively (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX,
    where bf16 matmuls run about 3x faster than float32) and float32 elsewhere.
    Statistics (Hessians, channel magnitudes) are still accumulated in float32.
    """
    if name not in FORWARD_DTYPES:
        raise ValueError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, got {name!r}")
    if name == "auto":
        if param.dtype != torch.float32:
            return None  # already a 16-bit model: run it as it is
        dev = "cpu" if param.device.type == "meta" else param.device.type  # lazily loaded: the store loads onto the CPU
        return torch.bfloat16 if native_bf16(dev) else None
    dtype = getattr(torch, name)
    return None if dtype == param.dtype else dtype
