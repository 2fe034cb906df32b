"""accelerate's mixed precision for distillation on a device: bfloat16 only where the hardware has it."""

from __future__ import annotations

import logging

import torch

from calibrate.forward import native_bf16

log = logging.getLogger(__name__)


def bf16_emulated(device: torch.device) -> bool:
    """Whether bfloat16 on `device` would be emulated (a CPU without AVX512-BF16 or AMX: about 20x slower)."""
    return device.type == "cpu" and not native_bf16("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """accelerate's mixed_precision for `name` on `device` ("auto": bf16 where the hardware has it)."""
    if name != "auto":
        if name == "bf16" and bf16_emulated(device):
            log.warning("mixed_precision bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so it is "
                        "emulated and far slower than float32 (about 20x on an AVX2 machine); auto picks float32 here")
        return name
    if native_bf16(device.type):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"
