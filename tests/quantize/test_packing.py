import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.quantize.packing import pack_int32, packed_len, unpack_int32


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    p = pack_int32(q, bits)
    assert p.dtype == torch.int32
    assert p.shape == (rows, packed_len(cols, bits))
    assert torch.equal(unpack_int32(p, bits, cols), q)


def test_bit_order_first_value_in_lowest_bits():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])
    # 0xF7654321 as a two's-complement int32
    assert pack_int32(q, 4).item() == 0xF7654321 - 2**32
    assert pack_int32(torch.tensor([[1, 2, 3, 255]]), 8).item() == 0xFF030201 - 2**32


def test_three_bits_ten_codes_per_word_and_padding():
    q = torch.full((1, 11), 7)
    p = pack_int32(q, 3)
    assert p.shape == (1, 2)
    assert p[0, 0].item() == 2**30 - 1  # ten 3-bit sevens
    assert p[0, 1].item() == 7  # one code, zero padding after it


def test_extreme_codes_all_ones():
    q = torch.full((3, 8), 15)
    assert torch.equal(unpack_int32(pack_int32(q, 4), 4, 8), q)


@pytest.mark.parametrize("bad", [-1, 16])
def test_out_of_range_codes_refused(bad):
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([[0, bad]]), 4)
