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


def test_dequantized_once_gives_the_same_numbers_and_is_released(make_tiny, tiny_tokenizer, monkeypatch):
    """Evaluation dequantizes packed weights once per run of tasks: identical results, cache dropped after,
    and skipped when the float weights would not fit."""
    from compress.quantize import qlinear
    from compress.quantize.qlinear import dequantized_once
    from compress.quantize.rtn import RTNConfig
    from compress.quantize.rtn import run as rtn
    from compress.runner import run_tasks
    from eval.backends import TorchBackend

    model = make_tiny("llama")
    rtn(model, RTNConfig(bits=4, group_size=32))
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    x = torch.randn(3, mods[0].in_features)
    plain = mods[0](x)
    with dequantized_once(model) as cached:
        assert cached and all(m.dequantized is not None for m in mods)
        assert torch.equal(mods[0](x), plain)
    assert all(m.dequantized is None for m in mods)
    monkeypatch.setattr(qlinear, "_free_bytes", lambda device: 1000)  # too little memory: unpack per call
    with dequantized_once(model) as cached:
        assert not cached and all(m.dequantized is None for m in mods)

    backend = TorchBackend(model, tiny_tokenizer, batch_size=4)
    opts = {"windows": 2, "seq_len": 64, "limit": 12}
    skipped = run_tasks(backend, ["wikitext2", "arc_easy"], options=opts)
    monkeypatch.undo()
    calls = []
    real = QuantLinear.dequantize_weight
    monkeypatch.setattr(QuantLinear, "dequantize_weight", lambda self: calls.append(1) or real(self))
    once = run_tasks(backend, ["wikitext2", "arc_easy"], options=opts)
    assert len(calls) == len(mods)  # each weight unpacked once for the whole run
    for task in ("wikitext2", "arc_easy"):
        assert once[task]["value"] == skipped[task]["value"]
        assert [it.get("nll", it.get("logprobs")) for it in once[task]["items"]] == \
            [it.get("nll", it.get("logprobs")) for it in skipped[task]["items"]]


def test_three_bit_artifact_of_the_earlier_sparse_layout_loads_repacked(model_dirs, tmp_path):
    """3-bit artifacts written before the dense layout (ten codes per word, no "packing" in the layout) still
    load, with the same weights, and are held (and saved again) in compressed-tensors' layout."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from compress.cli import cli
    from compress.models import load_model, save_model

    out = tmp_path / "w3"
    r = CliRunner().invoke(cli, ["quantize", str(model_dirs["llama"]), "--method", "rtn", "--bits", "3",
                                 "--group-size", "32", "--asym", "--out", str(out)])
    assert r.exit_code == 0, r.output
    new = load_model(out).model
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    prov = json.loads((old / "compress.json").read_text())
    for info in prov["quantization"]["modules"].values():
        assert info.pop("packing") == "dense"
    (old / "compress.json").write_text(json.dumps(prov))

    def sparse(codes, n):  # ten 3-bit codes per int32 word, as written before
        words = torch.zeros(codes.shape[0], -(-n // 10), dtype=torch.int64)
        for i in range(n):
            words[:, i // 10] |= codes[:, i].to(torch.int64) << (3 * (i % 10))
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    f = next(old.glob("*.safetensors"))
    state = load_file(f)
    for name in prov["quantization"]["modules"]:
        m = new.get_submodule(name)
        state[f"{name}.weight_packed"] = sparse(m.codes(), m.in_features)
        zp = torch.from_numpy(m.zero_point().numpy()).round().int().T  # (groups, out)
        state[f"{name}.weight_zero_point"] = sparse(zp, m.out_features).T.contiguous()
    save_file(state, f, metadata={"format": "pt"})
    lm = load_model(old)
    ids = torch.tensor([list(range(10, 50))])
    with torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, new(input_ids=ids).logits)
    name = next(iter(prov["quantization"]["modules"]))
    assert torch.equal(lm.model.get_submodule(name).weight_packed, new.get_submodule(name).weight_packed)
    save_model(lm, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "compress.json").read_text())
    assert again["quantization"]["modules"][name]["packing"] == "dense"
