"""Bit packing of unsigned integer codes into int32 words.

`32 // bits` codes share one int32 word along the last dimension, the first
code in the lowest bits (8 per word at 4 bits, 4 at 8 bits, 10 at 3 bits with
the top two bits unused, 16 at 2 bits). This is the word layout of
compressed-tensors' pack-quantized format; a row that does not fill its last
word is padded with zero codes.
"""

from __future__ import annotations

import torch


def per_word(bits: int) -> int:
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes into int32 words")
    return 32 // bits


def packed_len(n: int, bits: int) -> int:
    return -(-n // per_word(bits))


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (..., n) in [0, 2^bits) into int32 (..., ceil(n / (32 // bits)))."""
    k = per_word(bits)
    n = q.shape[-1]
    words = packed_len(n, bits)
    q = q.to(torch.int64)
    if int(q.min()) < 0 or int(q.max()) >= 2**bits:
        raise ValueError(f"codes out of range for {bits} bits: [{int(q.min())}, {int(q.max())}]")
    q = torch.nn.functional.pad(q, (0, words * k - n))
    shifts = torch.arange(k, dtype=torch.int64, device=q.device) * bits  # (k,)
    w = (q.reshape(*q.shape[:-1], words, k) << shifts).sum(-1)  # (..., words) in [0, 2^32)
    w = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret as two's complement int32
    return w.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 (..., words) -> int32 codes (..., n)."""
    k = per_word(bits)
    shifts = torch.arange(k, dtype=torch.int32, device=packed.device) * bits  # (k,)
    # Arithmetic right shift of a negative word fills with ones; the mask drops them.
    q = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., words, k)
    return q.reshape(*packed.shape[:-1], -1)[..., :n]
