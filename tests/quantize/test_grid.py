import pytest
import torch

from compress.quantize.grid import dequantize, fake_quantize, qparams, quantize, quantize_weight
from compress.quantize.scheme import QuantScheme


def test_symmetric_scale_puts_the_extreme_weight_on_the_lowest_code():
    s = QuantScheme(bits=4, group_size=4, symmetric=True, scale_dtype="float32")
    W = torch.tensor([[0.8, -0.4, 0.1, 0.0, -1.6, 0.2, 1.0, 0.0]])
    scale, zero = qparams(W, s)
    torch.testing.assert_close(scale, torch.tensor([[-0.1, 0.2]]))  # the extreme's sign: 0.8 -> -8 * -0.1
    assert torch.all(zero == 8)
    q = quantize(W, scale, zero, s)
    assert q.tolist() == [[0, 12, 7, 8, 0, 9, 13, 8]]   # signed -8, 4, -1, 0 | -8, 1, 5, 0
    torch.testing.assert_close(dequantize(q, scale, zero, s)[:, [0, 4]], W[:, [0, 4]])  # extremes exact


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_uses_every_code(bits):
    s = QuantScheme(bits=bits, group_size=-1, symmetric=True, scale_dtype="float32")
    W = torch.linspace(-1, 1, 2 ** (bits + 2)).reshape(1, -1)  # an even spread over the whole range
    q, _, _ = quantize_weight(W, s)
    assert q.unique().numel() == 2 ** bits


def test_symmetric_codes_stay_in_signed_range():
    s = QuantScheme(bits=3, group_size=-1, symmetric=True, scale_dtype="float32")
    W = torch.randn(16, 40)
    q, scale, zero = quantize_weight(W, s)
    signed = q - 4
    assert signed.min() >= -4 and signed.max() <= 3


def test_asymmetric_range_includes_zero_and_zero_point_is_integer():
    s = QuantScheme(bits=4, group_size=-1, symmetric=False, scale_dtype="float32")
    W = torch.tensor([[0.5, 1.0, 2.0, 3.0]])  # all positive: the range becomes [0, 3]
    scale, zero = qparams(W, s)
    torch.testing.assert_close(scale, torch.tensor([[0.2]]))
    assert zero.item() == 0
    Wq = fake_quantize(W, s)
    assert (Wq - W).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [-1, 32, 100, 128])
def test_error_at_most_half_a_step(bits, sym, group):
    s = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype="float32")
    W = torch.randn(12, 300)
    q, scale, zero = quantize_weight(W, s)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    step = scale.repeat_interleave(s.group_len(300), dim=1)[:, :300]
    err = (dequantize(q, scale, zero, s) - W).abs()
    # symmetric grids: the extreme's side reaches 2^(bits-1) steps, the other side one step less, so
    # weights there beyond the last code are off by up to a step; everything else rounds to within half a step
    step = step.abs()
    inside = (W / step).abs() <= 2 ** (bits - 1) - 0.5 if sym else torch.ones_like(W, dtype=torch.bool)
    assert torch.all(err[inside] <= step[inside] * 0.5 + 1e-6)
    assert torch.all(err <= step + 1e-6)


def test_short_last_group_has_its_own_scale():
    s = QuantScheme(bits=4, group_size=128, symmetric=True, scale_dtype="float32")
    W = torch.zeros(2, 576)
    W[:, 512:] = 0.07  # only the 64-wide tail group is non-zero
    scale, _ = qparams(W, s)
    assert scale.shape == (2, 5)
    torch.testing.assert_close(scale[:, 4], torch.full((2,), -0.07 / 8))
    torch.testing.assert_close(fake_quantize(W, s), W)


def test_scale_is_rounded_to_storage_dtype_before_coding():
    s = QuantScheme(bits=4, group_size=-1, symmetric=True, scale_dtype="float16")
    scale, _ = qparams(torch.randn(5, 64), s)
    assert torch.equal(scale, scale.half().float())


def test_zero_weights_round_trip_exactly():
    s = QuantScheme(bits=4, group_size=16, symmetric=False)
    W = torch.zeros(3, 32)
    assert torch.equal(fake_quantize(W, s), W)


@pytest.mark.parametrize("kw", [{"bits": 5}, {"group_size": 0}, {"scale_dtype": "int8"}])
def test_bad_scheme_lists_choices(kw):
    with pytest.raises(ValueError, match="must be"):
        QuantScheme(**kw)
