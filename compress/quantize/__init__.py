"""Weight quantization: schemes, integer grids, packing, the packed linear module and the passes."""

from compress.quantize.grid import dequantize, fake_quantize, quantize
from compress.quantize.packing import pack_int32, unpack_int32
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import QuantScheme

__all__ = [
    "QuantLinear",
    "QuantScheme",
    "dequantize",
    "fake_quantize",
    "pack_int32",
    "quantize",
    "unpack_int32",
]
