import pytest
import torch

from compress.pipeline import apply
from compress.quantize.awq import output_error, search_clip, search_scale
from compress.quantize.grid import fake_quantize
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import QuantScheme
from compress.recipe import Recipe


def _problem(n=128, out=96, T=4096, seed=0):
    """Inputs with a few large-magnitude channels, as in LLM activations."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, generator=g)
    X[:, :4] *= 20  # outlier channels
    W = torch.randn(out, n, generator=g)
    return W, X, X.T @ X / T, X.abs().mean(0)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 64, False), (4, -1, True), (2, 48, False)])
def test_scale_search_lowers_output_error(bits, group, sym):
    W, X, H, x_mean = _problem()
    s_ = QuantScheme(bits=bits, group_size=group, symmetric=sym)
    s, after, before = search_scale([W[:40], W[40:]], H, x_mean, s_)
    assert s.shape == (128,) and (s > 0).all()
    assert after < 0.9 * before  # outlier channels leave room to win
    # the reported error is the real output error of the scaled-then-rounded weights
    real = ((X @ (fake_quantize(W * s, s_) / s - W).T).pow(2).sum() / X.shape[0]).item()
    assert real == pytest.approx(after, rel=1e-3)
    assert output_error(fake_quantize(W, s_) - W, H) == pytest.approx(before, rel=1e-4)


def test_scale_search_never_worse_than_identity():
    W, X, H, x_mean = _problem()
    H = torch.eye(128)  # no activation structure: scaling can only hurt or tie
    s_ = QuantScheme(bits=4, group_size=32)
    s, after, before = search_scale([W], H, torch.ones(128), s_)
    assert after <= before


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_lowers_error_and_only_shrinks(sym):
    W, X, H, _ = _problem()
    W[:, 7] *= 6  # a few heavy weights make the full range wasteful
    s_ = QuantScheme(bits=3, group_size=32, symmetric=sym)
    Wc, after, before = search_clip(W, H, s_)
    assert after < before
    assert (Wc.abs() <= W.abs() + 1e-6).all()  # clipping never enlarges a weight
    assert not torch.equal(Wc, W)


@pytest.mark.parametrize("steps", [
    [{"pass": "awq", "bits": 3, "group_size": 32}],
    [{"pass": "awq", "bits": 3, "group_size": 32, "quantize": False}, {"pass": "gptq", "bits": 3, "group_size": 32}],
])
def test_awq_pass_beats_rtn_on_model_output(make_tiny, tiny_tokenizer, arch, steps):
    from compress.data import wikitext2_path

    text = wikitext2_path("validation").read_text()[:60_000]
    ids = torch.tensor(tiny_tokenizer(text).input_ids[: 16 * 64]).view(16, 64)
    test = torch.tensor(tiny_tokenizer(wikitext2_path("test").read_text()[:20_000]).input_ids[: 4 * 64]).view(4, 64)
    with torch.no_grad():
        target = make_tiny(arch)(test).logits
    errs = {}
    for name, recipe in (("rtn", Recipe.single("rtn", bits=3, group_size=32)), ("awq", Recipe.from_steps(steps))):
        m = make_tiny(arch)
        reports = apply(m, recipe, ids)
        assert sum(isinstance(x, QuantLinear) for x in m.modules()) == (14 if arch == "llama" else 12)
        with torch.no_grad():
            errs[name] = (m(test).logits - target).pow(2).mean().item()
    assert reports[0].metrics["scaled_stages"] == (6 if arch == "llama" else 8)
    assert reports[0].metrics["clip_error_ratio"] < 1
    assert errs["awq"] < 0.9 * errs["rtn"]  # (RTN on the full-range symmetric grid is hard to beat by more)


def test_awq_without_quantize_keeps_the_function(make_tiny, tiny_tokenizer):
    """Scales folded with no clipping and no rounding: same model output, different weights."""
    ids = torch.randint(0, len(tiny_tokenizer), (8, 32))
    ref, m = make_tiny("llama"), make_tiny("llama")
    apply(m, Recipe.single("awq", bits=3, group_size=32, quantize=False, clip=False), ids)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, ref.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        a, b = m(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def test_awq_config_errors():
    with pytest.raises(ValueError, match="max_shrink"):
        Recipe.single("awq", max_shrink=1.5)
    with pytest.raises(ValueError, match="needs calibration"):
        apply(torch.nn.Linear(2, 2), Recipe.single("awq"))
