"""Mixture-of-experts calibration: every expert's statistics come from the tokens routed to it, counted here
independently of the code under test (from the router's own top-k choices), and an expert routed too few
tokens is calibrated on all of its layer's tokens and named in the report."""

from __future__ import annotations

import copy

import pytest
import torch
from test_arch_matrix import make_arch_model

from calibrate.experts import Experts, unfuse_experts
from calibrate.stats import HessianCollector
from compress.pipeline import apply
from compress.quantize.qlinear import QuantLinear
from compress.recipe import Recipe


@pytest.fixture(params=["qwen3_moe", "mixtral"])
def moe(request, tiny_tokenizer):
    fused = make_arch_model(request.param, len(tiny_tokenizer) + 8)
    model = copy.deepcopy(fused)
    assert unfuse_experts(model) == 2
    return fused, model


def _calib(tiny_tokenizer, n=4, length=64) -> torch.Tensor:
    return torch.randint(3, len(tiny_tokenizer), (n, length), generator=torch.Generator().manual_seed(1))


def test_unfused_experts_compute_what_the_fused_ones_do(moe, tiny_tokenizer):
    fused, model = moe
    ids = _calib(tiny_tokenizer, 2, 40)
    with torch.no_grad():
        assert torch.allclose(fused(ids).logits, model(ids).logits, atol=1e-5)
    assert not any(p.dim() > 2 for p in model.parameters())
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"model.layers.1.mlp.experts.3.down_proj", "model.layers.1.mlp.experts.3.w2"} & names


def _counting(model, monkeypatch):
    """Log each router call's per-expert counts and each Hessian collector's tokens, in one event order."""
    events: list[tuple] = []
    names = {id(m): n for n, m in model.named_modules()}
    for n, m in model.named_modules():
        if n.endswith("mlp.gate"):
            m.register_forward_hook(lambda mod, a, out, n=n: events.append(
                ("route", n.rpartition(".gate")[0], torch.bincount(out[2].flatten(), minlength=4), out[2].shape[0])))
    made: list[HessianCollector] = []
    of, add = HessianCollector.of, HessianCollector.add_batch

    def tagged_of(linear):
        (c,) = of(linear)
        c.name, c.start, c.end = names[id(linear)], len(events), None
        made.append(c)
        return (c,)

    def logged_add(self, x):
        add(self, x)
        self.end = len(events)

    monkeypatch.setattr(HessianCollector, "of", staticmethod(tagged_of))
    monkeypatch.setattr(HessianCollector, "add_batch", logged_add)
    return events, made


def test_gptq_calibrates_every_expert_on_its_routed_tokens(moe, tiny_tokenizer, monkeypatch):
    _, model = moe
    events, made = _counting(model, monkeypatch)
    [rep] = apply(model, Recipe.single("gptq", group_size=32, min_expert_tokens=0), _calib(tiny_tokenizer))
    experts = [c for c in made if ".experts." in c.name]
    assert len(experts) == 2 * 4 * 2  # layers x experts x stages (gate/up, down)
    for c in experts:
        layer, _, rest = c.name.partition(".experts.")
        e = int(rest.split(".")[0])
        # the router's choices in the pass that fed this collector, counted from the router's output
        routed = sum(int(ev[2][e]) for ev in events[c.start:c.end] if ev[0] == "route" and ev[1] == layer)
        assert c.tokens == routed > 0, (c.name, c.tokens, routed)
    total = 4 * 64
    counts = rep.config["expert_tokens"]
    assert set(counts) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(sum(v) == 2 * total for v in counts.values())  # top-2: every token twice
    assert rep.config["experts_on_all_tokens"] == []
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * (4 + 4 * 3)  # every expert quantized
    assert type(model.model.layers[0].mlp.gate).__name__.endswith("TopKRouter")  # the router stays float
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32


def _never_route_to(model, layer: int, expert: int) -> None:
    """Starve one expert: a hook on the router replaces it in every token's choices by an expert not chosen."""
    def hook(mod, args, out):
        logits, weights, idx = out
        idx = idx.clone()  # (tokens, k)
        for t in (idx == expert).any(-1).nonzero().flatten().tolist():
            free = [e for e in range(len(logits[0])) if e != expert and e not in idx[t].tolist()]
            idx[t][idx[t] == expert] = free[0]
        return logits, weights, idx

    model.model.layers[layer].mlp.gate.register_forward_hook(hook)


def test_a_starved_expert_is_calibrated_on_all_tokens_and_named(moe, tiny_tokenizer, monkeypatch):
    _, model = moe
    _never_route_to(model, 0, 2)
    ids = _calib(tiny_tokenizer)
    with pytest.raises(ValueError, match="no calibration tokens"):  # what the fallback is for
        apply(copy.deepcopy(model), Recipe.single("gptq", group_size=32, min_expert_tokens=0), ids)
    events, made = _counting(model, monkeypatch)
    [rep] = apply(model, Recipe.single("gptq", group_size=32), ids)  # the default threshold: 64 tokens
    assert rep.config["expert_tokens"]["model.layers.0.mlp.experts"][2] == 0
    assert rep.config["experts_on_all_tokens"] == ["model.layers.0.mlp.experts.2"]
    assert rep.config["min_expert_tokens"] == 64
    on_all = [c for c in made if c.name.startswith("model.layers.0.mlp.experts.2.")]
    assert len(on_all) == 2 and all(c.tokens == 4 * 64 for c in on_all)  # every token of the layer
    others = [c for c in made if ".experts." in c.name and c not in on_all]
    assert all(0 < c.tokens < 4 * 64 for c in others)  # routed tokens only
    assert isinstance(model.model.layers[0].mlp.experts[2].down_proj
                      if hasattr(model.model.layers[0].mlp.experts[2], "down_proj")
                      else model.model.layers[0].mlp.experts[2].w2, QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1]).logits).all()


def test_experts_layout_refused_when_not_standard(tiny_tokenizer):
    from compress.targets import refuse_uncompressible

    model = make_arch_model("qwen3_moe", len(tiny_tokenizer) + 8)
    for m in model.modules():
        if hasattr(m, "is_transposed"):
            m.is_transposed = True  # (gpt-oss stores its experts transposed, with biases)
    assert unfuse_experts(model) == 0
    with pytest.raises(ValueError, match="fused 3-D tensors .*mixture-of-experts experts"):
        refuse_uncompressible(model)


def test_routing_report_is_empty_for_dense_models(make_tiny, tokens):
    model = make_tiny("llama")
    [rep] = apply(model, Recipe.single("gptq", group_size=32), tokens.view(2, 48))
    assert "expert_tokens" not in rep.config and not any(isinstance(m, Experts) for m in model.modules())


def test_min_expert_tokens_on_the_command_line(tmp_path, tiny_tokenizer):
    """--min-expert-tokens reaches every calibrated step of the recipe (the report names each expert below it);
    with a pass that calibrates nothing it is refused in one line, nothing written."""
    import json

    from click.testing import CliRunner

    from compress.cli import cli

    make_arch_model("qwen3_moe", len(tiny_tokenizer) + 8).save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    run = CliRunner().invoke
    r = run(cli, ["quantize", str(tmp_path / "src"), "--method", "awq+gptq", "--group-size", "32",
                  "--calib-samples", "2", "--calib-seq-len", "32", "--min-expert-tokens", "100000",
                  "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    reports = json.loads((tmp_path / "q" / "compress.json").read_text())["reports"]
    for rep in reports:  # awq and gptq: every expert of both layers is below 100000 tokens
        assert rep["config"]["min_expert_tokens"] == 100000
        assert len(rep["config"]["experts_on_all_tokens"]) == 2 * 4, rep["config"]
    r = run(cli, ["quantize", str(tmp_path / "src"), "--method", "rtn", "--min-expert-tokens", "8",
                  "--out", str(tmp_path / "rtn")])
    assert r.exit_code == 1 and "--min-expert-tokens applies to calibrated passes" in r.output, r.output
    assert not (tmp_path / "rtn").exists()


def test_block_tune_quantizes_every_expert_and_lowers_block_error(moe, tiny_tokenizer):
    """Experts a training batch routes no token to get no gradient on it; every expert still ends packed, and
    tuning lowers the blocks' output error (routing included) from GPTQ's start."""
    fused, model = moe
    ids = _calib(tiny_tokenizer, 8, 32)
    [rep] = apply(model, Recipe.single("block_tune", group_size=32, bits=3, iters=30, batch_size=2,
                                       min_expert_tokens=0), ids)
    experts = [n for n, m in model.named_modules() if ".experts." in n and isinstance(m, QuantLinear)]
    assert len(experts) == 2 * 4 * 3 and rep.modules == len(
        [m for m in model.modules() if isinstance(m, QuantLinear)])
    assert rep.metrics["block_mse_after"] < rep.metrics["block_mse_before"]
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2]).logits).all()
