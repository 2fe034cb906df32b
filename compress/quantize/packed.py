"""The packed-module kinds: Linears whose weights are stored as integer codes, each kind loading itself.

A kind subclasses `PackedLinear` with a `kind` name; that registers it, so
the artifact loader rebuilds any recorded module from its layout
(`from_layout(layout(m))`) and code that only needs the weight
(`dequantize_weight`), the storage size or the logical shape asks the module,
without knowing the kinds. Built-in kinds: `QuantLinear` (weight-only
integer groups, compressed-tensors pack-quantized) and `W8A8Linear` (int8
weights and activations).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class PackedLinear(nn.Module):
    """Base of the packed Linear kinds: `kind` names a subclass in `PackedLinear.kinds`."""

    kind: ClassVar[str]
    kinds: ClassVar[dict[str, type[PackedLinear]]] = {}  # kind -> class, filled as the kinds are defined
    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            PackedLinear.kinds[cls.kind] = cls

    @classmethod
    def from_layout(cls, layout: dict[str, Any], dtype: torch.dtype) -> PackedLinear:
        """An empty module of the recorded `layout` (its tensors are loaded after), in compute dtype `dtype`."""
        raise TypeError(f"{cls.__name__} does not define from_layout")

    def layout(self) -> dict[str, Any]:
        """What `from_layout` needs to rebuild this module (recorded in the artifact's provenance)."""
        raise TypeError(f"{type(self).__name__} does not define layout")

    def dequantize_weight(self) -> torch.Tensor:
        """The (out, in) float weight the module multiplies by."""
        raise TypeError(f"{type(self).__name__} does not define dequantize_weight")

    def storage_bits(self) -> int:
        """Bits its weight takes on disk (codes, scales, zero points)."""
        raise TypeError(f"{type(self).__name__} does not define storage_bits")


DEFAULT_KIND = "quant"  # the kind of a recorded layout without one (QuantLinear: artifacts before kinds existed)


def from_layout(layout: dict[str, Any], dtype: torch.dtype) -> PackedLinear:
    """Rebuild a recorded packed module of any registered kind (a kind registers when its module is imported:
    the loader imports the built-in ones)."""
    kind = layout.get("kind", DEFAULT_KIND)
    cls = PackedLinear.kinds.get(kind)
    if cls is None:
        raise ValueError(f"unknown packed module kind {kind!r}; known: {', '.join(sorted(PackedLinear.kinds))}")
    return cls.from_layout(layout, dtype)
