import pytest
import torch

from compress.quantize.grid import fake_quantize, quantize_weight
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [-1, 64, 100])
def test_forward_matches_fake_quant_reference(bits, sym, group):
    torch.manual_seed(bits)
    s = QuantScheme(bits=bits, group_size=group, symmetric=sym)
    W, b, x = torch.randn(48, 200), torch.randn(48), torch.randn(3, 7, 200)
    q, scale, zero = quantize_weight(W, s)
    m = QuantLinear.from_codes(q, scale, zero, s, bias=b)
    ref = torch.nn.functional.linear(x, fake_quantize(W, s), b)
    y = m(x)
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-5
    assert torch.equal(m.codes(), q)


def test_buffers_are_packed_and_storage_is_about_four_bits():
    s = QuantScheme(bits=4, group_size=128, symmetric=True)
    W = torch.randn(576, 576)
    m = QuantLinear.from_codes(*quantize_weight(W, s), s)
    assert m.weight_packed.dtype == torch.int32 and m.weight_packed.shape == (576, 72)
    # 128 does not divide 576: stored as 9 groups of 64 (compressed-tensors needs dividing groups),
    # each group-of-128 scale twice, the same weights
    assert m.weight_scale.shape == (576, 9) and m.weight_scale.dtype == torch.float16 and m.scheme.group_size == 64
    assert torch.equal(m.weight_scale[:, 0], m.weight_scale[:, 1]) and torch.equal(m.dequantize_weight(), fake_quantize(W, s))
    assert not hasattr(m, "weight_zero_point")
    assert m.weight_shape.tolist() == [576, 576]
    assert 4.0 < m.storage_bits() / W.numel() <= 4.3


def test_asymmetric_zero_points_packed_along_output_dim():
    s = QuantScheme(bits=4, group_size=32, symmetric=False)
    W = torch.rand(20, 64) + 0.1  # all positive -> zero point 0 in every group
    q, scale, zero = quantize_weight(W, s)
    m = QuantLinear.from_codes(q, scale, zero, s)
    assert m.weight_zero_point.shape == (3, 2)  # ceil(20 / 8) words x 2 groups
    assert torch.equal(m.zero_point(), zero)


def test_pending_swaps_free_the_float_weights():
    from torch import nn

    from compress.quantize.qlinear import PendingSwaps

    parent = nn.Sequential(nn.Linear(64, 32))
    lin = parent[0]
    s = QuantScheme(bits=4, group_size=32)
    q, scale, zero = quantize_weight(lin.weight.detach(), s)
    pending = PendingSwaps()
    pending.add("0", lin, q, scale, zero, s)
    x = torch.randn(3, 64)
    y = parent(x)  # the float module now computes with the dequantized weight
    bits = pending.commit(parent)
    assert isinstance(parent[0], QuantLinear) and bits == parent[0].storage_bits()
    assert torch.equal(parent(x), y)
    assert lin.weight.is_meta  # the replaced module no longer holds memory
