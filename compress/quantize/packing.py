"""Bit packing of unsigned integer codes into int32 words: compressed-tensors' dense layout.

Code i of a row starts at bit i * bits of the row's bit string, which is cut
into little-endian int32 words: at 4 bits a word holds codes 0..7 (code 0 in
the lowest bits), at 8 bits codes 0..3, at 2 bits 0..15. Widths that do not
divide 32 straddle words: at 3 bits, 32 codes fill exactly 3 words and code 10
has its low two bits at the top of word 0 and its high bit at the bottom of
word 1. A row takes ceil(n * bits / 32) words; the unused bits of its last word
are zero. This is `pack_to_int32` of compressed-tensors >= 0.20 (the
pack-quantized format), so any width it supports loads there unchanged.

Before this layout, 3-bit artifacts were written ten codes per word (the top
two bits unused); `unpack_int32_sparse` still reads them.
"""

from __future__ import annotations

import torch


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"cannot pack {bits}-bit codes into int32 words")


def packed_len(n: int, bits: int) -> int:
    """Words per row of n codes."""
    _check_bits(bits)
    return -(-n * bits // 32)


def _positions(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 codes that fill `bits` words exactly: each code's word and bit offset in that word."""
    start = torch.arange(32, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (..., n) in [0, 2^bits) into int32 (..., ceil(n * bits / 32))."""
    n = q.shape[-1]
    words = packed_len(n, bits)
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(q.min())}, {int(q.max())}]")
    groups = -(-n // 32)
    q = torch.nn.functional.pad(q, (0, groups * 32 - n)).reshape(*q.shape[:-1], groups, 32)
    word, off = _positions(bits, q.device)
    out = torch.zeros(*q.shape[:-1], bits + 1, dtype=torch.int64, device=q.device)  # +1: spill of the last code
    # a code's low part lands in its word, the bits that do not fit there in the next one; parts never overlap,
    # so adding them is or-ing them
    out.scatter_add_(-1, word.expand_as(q), (q << off) & 0xFFFFFFFF)
    out.scatter_add_(-1, (word + 1).expand_as(q), q >> (32 - off))
    w = out[..., :bits].reshape(*q.shape[:-2], groups * bits)[..., :words]  # (..., words) in [0, 2^32)
    w = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret as two's complement int32
    return w.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 (..., words) -> int32 codes (..., n)."""
    _check_bits(bits)
    if 32 % bits == 0:  # no code straddles two words: shift each word in int32 (memory: the codes, once more)
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        q = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # arithmetic shift: the mask clears the sign bits
        return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]
    groups = -(-n // 32)
    w = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned words
    w = torch.nn.functional.pad(w, (0, groups * bits + 1 - w.shape[-1])).unfold(-1, bits + 1, bits)
    word, off = _positions(bits, packed.device)  # (..., groups, bits + 1): each group's words and the next one
    lo, hi = w[..., word], w[..., word + 1]
    q = ((lo >> off) | (hi << (32 - off))) & (2**bits - 1)  # hi only matters for a code that straddles
    return q.reshape(*packed.shape[:-1], groups * 32)[..., :n].to(torch.int32)


def unpack_int32_sparse(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes from the earlier layout, `32 // bits` whole codes per word (how 3-bit artifacts were written)."""
    _check_bits(bits)
    k = 32 // bits
    shifts = torch.arange(k, dtype=torch.int32, device=packed.device) * bits  # (k,)
    # Arithmetic right shift of a negative word fills with ones; the mask drops them.
    q = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., words, k)
    return q.reshape(*packed.shape[:-1], -1)[..., :n]
