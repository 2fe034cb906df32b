"""block_tune: AutoRound-style rounding and clipping tuned per block against the float block's output."""

import copy

import pytest
import torch

from compress.data import wikitext2_path
from compress.pipeline import apply
from compress.quantize.block_tune import BlockTuneConfig, TunedRounding
from compress.quantize.gptq import quantize_weight as gptq_weight
from compress.quantize.grid import quantize_weight as rtn_weight
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import QuantScheme
from compress.recipe import Recipe


def _windows(tok, n, seq, split="validation", chars=60_000):
    text = wikitext2_path(split).read_text()[:chars]
    return torch.tensor(tok(text).input_ids[: n * seq]).view(n, seq)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 80, False), (2, -1, False), (4, 64, False)])
def test_untrained_rounding_reproduces_its_start_exactly(bits, group, sym):
    """Offsets 0 and factors 1: RTN's codes from the weights, GPTQ's codes from the weights GPTQ rounded."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 160, generator=g), torch.randn(512, 160, generator=g)
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym)
    q, s, z = rtn_weight(W, scheme)
    got = TunedRounding(W, s, z, scheme, bias=None, keep_zero=None, clip=True).result()
    assert all(torch.equal(a, b) for a, b in zip(got, (q, s, z), strict=True))
    updated = torch.empty_like(W)
    q, s, z, _ = gptq_weight(W, X.T @ X, scheme, updated=updated)
    got = TunedRounding(updated, s, z, scheme, bias=None, keep_zero=None, clip=True).result()
    assert all(torch.equal(a, b) for a, b in zip(got, (q, s, z), strict=True))
    assert not torch.equal(updated, W)  # GPTQ moved the weights it rounded


def test_trained_offsets_and_factors_stay_on_the_grid_and_in_range():
    W = torch.randn(8, 64)
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    m = TunedRounding(W, *rtn_weight(W, scheme)[1:], scheme, bias=None, keep_zero=None, clip=True)
    for _ in range(30):
        m(torch.randn(4, 64)).pow(2).sum().backward()
        m.step(0.2)
        m.zero_grad()
    assert m.v.abs().max() <= 0.5 and m.factors.min() >= 0.5 and m.factors.max() <= 1.0
    q, s, z = m.result()
    assert q.min() >= 0 and q.max() <= 7 and torch.equal(z, z.round()) and torch.equal(s, s.half().float())
    # what it multiplies by is the stored grid's dequantized weight
    w = ((q.view(8, 2, 32).float() - z[..., None]) * s[..., None]).view(8, 64)
    assert torch.equal(m.weight().detach(), w)


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_block_tune_beats_its_start_on_model_output(make_tiny, tiny_tokenizer, arch, init):
    ids, test = _windows(tiny_tokenizer, 16, 64), _windows(tiny_tokenizer, 4, 64, "test", 20_000)
    with torch.no_grad():
        target = make_tiny(arch)(test).logits
    errs, codes = {}, {}
    for name, step in (("start", {"pass": init}),
                       ("tuned", {"pass": "block_tune", "init": init, "iters": 100, "batch_size": 4})):
        m = make_tiny(arch)
        [rep] = apply(m, Recipe.from_steps([{**step, "bits": 3, "group_size": 32}]), ids)
        packed = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
        assert rep.modules == len(packed) == (14 if arch == "llama" else 12)
        codes[name] = {n: x.codes() for n, x in packed.items()}
        with torch.no_grad():
            errs[name] = (m(test).logits - target).pow(2).mean().item()
    assert rep.metrics["block_mse_after"] < rep.metrics["block_mse_before"]
    # RTN's start: tuning gains 35-70 %. GPTQ's start on the full-range symmetric grid is already good on these
    # random models: 0.0246 -> 0.0182 on one, but on the tiny llama 0.0736 -> 0.0738 (2 threads) or 0.0769 (one
    # thread, a parallel test run), its block loss lower on the 1,024 calibration tokens but not its output on
    # the test windows: there the test only bounds the loss
    assert errs["tuned"] < {"rtn": 0.75, "gptq": 1.1}[init] * errs["start"]
    assert any(not torch.equal(codes["start"][n], codes["tuned"][n]) for n in codes["start"])


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_a_block_tuning_cannot_improve_keeps_its_start_codes(make_tiny, tiny_tokenizer, init):
    """One step never beats the start (the best state is the start's): every block keeps the codes of the pass
    it starts from, computed on the same activations, so the artifact equals that pass's."""
    ids = _windows(tiny_tokenizer, 8, 32)
    m, ref = make_tiny("llama"), make_tiny("llama")
    [rep] = apply(m, Recipe.single("block_tune", init=init, iters=1, bits=4, group_size=32, symmetric=False), ids)
    apply(ref, Recipe.single(init, bits=4, group_size=32, symmetric=False), ids)
    assert rep.metrics["blocks_improved"] == 0
    a, b = m.state_dict(), ref.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pruned_weights_stay_zero(make_tiny, tiny_tokenizer):
    ids = _windows(tiny_tokenizer, 8, 32)
    m = make_tiny("llama")
    apply(m, Recipe.single("magnitude", sparsity=0.5), None)
    zero = {n: x.weight == 0 for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and "layers" in n}
    apply(m, Recipe.single("block_tune", iters=20, bits=4, group_size=32, symmetric=False), ids)
    for n, mask in zero.items():
        assert mask.float().mean() > 0.4
        assert (m.get_submodule(n).dequantize_weight()[mask] == 0).all(), n


def test_untouched_blocks_carry_the_float_activations(make_tiny, tiny_tokenizer):
    """Block 0 left float: block 1 is tuned against the float block 1 on block 0's float output, which the
    float stream must have run through block 0 (tuning against its input instead would be far worse)."""
    ids = _windows(tiny_tokenizer, 8, 32)
    m, start = make_tiny("llama"), make_tiny("llama")
    only1 = {"targets": ["re:model\\.layers\\.1\\..*_proj"], "bits": 3, "group_size": 32}
    [rep] = apply(m, Recipe.single("block_tune", iters=40, **only1), ids)
    apply(start, Recipe.single("gptq", **only1), ids)
    assert rep.metrics["block_mse_after"] < rep.metrics["block_mse_before"]
    assert type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantLinear)


@pytest.mark.parametrize("bad,match", [({"iters": 0}, "iters"), ({"init": "awq"}, "init"),
                                       ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        BlockTuneConfig(**bad)


def test_needs_calibration(make_tiny):
    with pytest.raises(ValueError, match="needs calibration"):
        apply(make_tiny("llama"), Recipe.single("block_tune"))


def test_composes_after_awq_scaling(make_tiny, tiny_tokenizer):
    ids = _windows(tiny_tokenizer, 8, 32)
    m = make_tiny("llama")
    ref = copy.deepcopy(m)
    reps = apply(m, Recipe.from_steps([{"pass": "awq", "quantize": False, "bits": 4, "group_size": 32},
                                       {"pass": "block_tune", "iters": 20, "bits": 4, "group_size": 32}]), ids)
    assert [r.name for r in reps] == ["awq", "block_tune"]
    with torch.no_grad():
        a, b = m(ids[:2]).logits, ref(ids[:2]).logits
    assert torch.isfinite(a).all() and (a - b).pow(2).mean() < b.pow(2).mean()
