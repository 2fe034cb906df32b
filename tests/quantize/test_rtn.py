import torch
from torch import nn

from compress.pipeline import apply
from compress.quantize.qlinear import QuantLinear
from compress.recipe import Recipe


def test_rtn_replaces_linears_except_lm_head(arch, make_tiny, tokens):
    model = make_tiny(arch)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    with torch.no_grad():
        ref = model(tokens).logits
    [report] = apply(model, Recipe.single("rtn", bits=4, group_size=32))
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert report.modules == len(quant) == n_linear - 1
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert 4.0 < report.metrics["bits_per_weight"] < 4.6
    with torch.no_grad():
        out = model(tokens).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.5  # really quantized, still the same function roughly


def test_rtn_8bit_is_close_and_lower_bits_worse(arch, make_tiny, tokens):
    errs = {}
    for bits in (8, 4, 2):
        model = make_tiny(arch)
        with torch.no_grad():
            ref = model(tokens).logits
        apply(model, Recipe.single("rtn", bits=bits, group_size=-1))
        with torch.no_grad():
            errs[bits] = ((model(tokens).logits - ref).norm() / ref.norm()).item()
    assert errs[8] < 0.05
    assert errs[8] < errs[4] < errs[2]


def test_rtn_respects_targets_and_ignore(make_tiny):
    model = make_tiny("llama")
    [report] = apply(model, Recipe.single("rtn", targets=["re:.*mlp\\."], ignore=["re:.*layers\\.1\\."]))
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quant == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert report.modules == 3
