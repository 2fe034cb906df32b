import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.quantize.packing import pack_int32, packed_len, unpack_int32, unpack_int32_sparse


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
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


def test_three_bits_straddle_words_and_pad_with_zeros():
    q = torch.full((1, 11), 7)
    p = pack_int32(q, 3)
    assert p.shape == (1, 2)  # 33 bits
    assert p[0, 0].item() == -1  # ten sevens and the low two bits of the eleventh
    assert p[0, 1].item() == 1  # its high bit, zero padding after it
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 5]])  # code 10 = 0b101: 0b01 at bits 30-31, 0b1 in word 1
    w0 = sum(int(c) << (3 * i) for i, c in enumerate(q[0, :10])) | (0b01 << 30)
    assert pack_int32(q, 3).tolist() == [[w0, 1]]  # bit 31 clear: a positive int32
    assert packed_len(32, 3) == 3 and packed_len(576, 3) == 54 and packed_len(33, 3) == 4


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_layout_is_compressed_tensors_pack_to_int32(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    for cols in (1, 11, 31, 32, 33, 70, 576):
        q = torch.randint(0, 2**bits, (3, cols), generator=g)
        theirs = helpers.pack_to_int32((q - 2 ** (bits - 1)).to(torch.int8), bits)  # they take signed codes
        assert torch.equal(pack_int32(q, bits), theirs)


def test_earlier_sparse_three_bit_words_still_read():
    q = torch.randint(0, 8, (2, 25))
    words = torch.zeros(2, 3, dtype=torch.int64)
    for i in range(25):
        words[:, i // 10] |= q[:, i] << (3 * (i % 10))
    assert torch.equal(unpack_int32_sparse(words.to(torch.int32), 3, 25), q.int())


def test_extreme_codes_all_ones():
    q = torch.full((3, 8), 15)
    assert torch.equal(unpack_int32(pack_int32(q, 4), 4, 8), q)


@pytest.mark.parametrize("bad", [-1, 16])
def test_out_of_range_codes_refused(bad):
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([[0, bad]]), 4)
