"""`rotate`: norm folding and orthogonal rotations of the residual stream (R1) and of each head's values (R2),
folded into the weights: the same function in float, fewer outliers for the quantizer after it."""

from __future__ import annotations

import copy

import pytest
import torch
from test_arch_matrix import make_arch_model

from compress.pipeline import apply
from compress.quantize.rotate import orthogonal
from compress.recipe import Recipe


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.double()


@pytest.fixture
def ids(tiny_tokenizer):
    return torch.randint(3, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))


def _non_unit_norms(model):
    """Give every RMSNorm a non-trivial weight (they start at ones), so that folding them is tested."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") and p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def test_matrices_are_orthogonal():
    g = torch.Generator().manual_seed(0)
    for n in (64, 576, 96):  # Hadamard (power of two) and QR (otherwise)
        q = orthogonal(n, g)
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("residual", [True, False])
def test_rotation_keeps_the_function(arch, residual, tiny_tokenizer, ids, tmp_path):
    """R1 + R2 (norms folded first) or R2 alone (norms untouched): the same logits, an ordinary checkpoint."""
    from transformers import AutoModelForCausalLM

    model = _non_unit_norms(make_arch_model(arch, len(tiny_tokenizer) + 8).eval())
    want = _logits(model, ids)
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    [rep] = apply(model, Recipe.single("rotate", residual=residual), None)
    got = _logits(model, ids)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before)  # not a no-op
    norms = [p for n, p in model.named_parameters() if n.endswith("layernorm.weight")]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms) == residual  # folded only for R1
    assert rep.config["untied_head"] == (residual and bool(make_arch_model(arch, 8).config.tie_word_embeddings))
    model.save_pretrained(tmp_path / "rot")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "rot", dtype=torch.float32).eval()
    assert (_logits(back, ids) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_rotation_spreads_outliers_so_rtn_loses_less(tiny_tokenizer, ids):
    """Residual channels 7 and 19 carry 30x larger values and weights (as real models' massive activations):
    after rotation no weight column stands out (max / rms of q_proj falls several-fold) and RTN W4 of the
    rotated model is closer to the float model than RTN W4 of the unrotated one."""
    model = make_arch_model("llama", len(tiny_tokenizer) + 8).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [7, 19]] *= 30
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[:, [7, 19]] *= 30
    want = _logits(model, ids)

    def peak(m):  # how far the largest q_proj weight stands out
        w = m.model.layers[0].self_attn.q_proj.weight
        return float(w.abs().max() / w.pow(2).mean().sqrt())

    rotated = copy.deepcopy(model)
    apply(rotated, Recipe.single("rotate"), None)
    assert peak(rotated) < peak(model) / 3, (peak(rotated), peak(model))
    errors = {}
    for name, m in (("plain", copy.deepcopy(model)), ("rotated", rotated)):
        apply(m, Recipe.single("rtn", bits=4, group_size=32), None)
        errors[name] = float((_logits(m, ids) - want).pow(2).mean().sqrt())
    assert errors["rotated"] < errors["plain"], errors


@pytest.mark.parametrize(("arch", "words"), [("gemma2", "model type 'gemma2'"), ("opt", "model type 'opt'"),
                                             ("phi3", "model type 'phi3'")])
def test_what_cannot_fold_is_refused_with_the_reason(arch, tiny_tokenizer, words):
    model = make_arch_model(arch, len(tiny_tokenizer) + 8)
    with pytest.raises(ValueError, match=words):
        apply(model, Recipe.single("rotate"), None)


def test_a_quantized_model_is_refused(tiny_tokenizer):
    model = make_arch_model("llama", len(tiny_tokenizer) + 8)
    apply(model, Recipe.single("rtn", bits=4, group_size=32), None)
    with pytest.raises(ValueError, match="rotate before quantizing"):
        apply(model, Recipe.single("rotate"), None)
