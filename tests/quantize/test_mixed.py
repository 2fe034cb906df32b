import itertools
import json

import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli
from compress.pipeline import apply
from compress.quantize.mixed import allocate, storage_bits
from compress.quantize.qlinear import QuantLinear
from compress.quantize.scheme import QuantScheme
from compress.recipe import Recipe


def _brute(errors, costs, budget):
    names = list(errors)
    best = None
    for combo in itertools.product(*(list(errors[n]) for n in names)):
        c = sum(costs[n][b] for n, b in zip(names, combo, strict=True))
        e = sum(errors[n][b] for n, b in zip(names, combo, strict=True))
        if c <= budget and (best is None or e < best):
            best = e
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocation_respects_the_budget_and_is_near_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    errors, costs = {}, {}
    for i in range(6):
        size = int(torch.randint(1, 10, (1,), generator=g)) * 100
        sens = float(torch.rand(1, generator=g)) * 10
        errors[f"l{i}"] = {b: sens * size * 4.0 ** -b for b in (2, 3, 4, 8)}  # error falls ~4x per bit
        costs[f"l{i}"] = {b: size * (b + 0.25) for b in (2, 3, 4, 8)}
    total_min = sum(c[2] for c in costs.values())
    budget = total_min * float(1 + torch.rand(1, generator=g) * 1.5)
    choice = allocate(errors, costs, budget)
    assert sum(costs[n][b] for n, b in choice.items()) <= budget
    got = sum(errors[n][b] for n, b in choice.items())
    assert got <= 1.5 * _brute(errors, costs, budget) + 1e-12
    # never worse than the best uniform width that fits
    for b in (2, 3, 4, 8):
        if sum(c[b] for c in costs.values()) <= budget:
            assert got <= sum(e[b] for e in errors.values()) + 1e-12


def test_allocation_below_minimum_is_an_error():
    with pytest.raises(ValueError, match="below the smallest possible size"):
        allocate({"a": {2: 1.0, 4: 0.1}}, {"a": {2: 200, 4: 400}}, 100)


@pytest.mark.parametrize("bits,group,sym", [(3, 32, True), (4, 48, False), (2, -1, False), (8, 64, True)])
def test_storage_bits_match_the_packed_module(bits, group, sym):
    s = QuantScheme(bits=bits, group_size=group, symmetric=sym)
    q = torch.randint(0, 2**bits, (40, 160), dtype=torch.int32)  # 48 does not divide 160: stored as groups of 16
    ng = s.n_groups(160)
    zero = torch.full((40, ng), float(2 ** (bits - 1))) if sym else torch.randint(0, 2**bits, (40, ng)).float()
    m = QuantLinear.from_codes(q, torch.rand(40, ng), zero, s)
    assert storage_bits(40, 160, s) == m.storage_bits()


def test_a_group_size_that_would_store_tiny_groups_is_refused():
    """Group 32 on a width of 100 could only be stored as groups of gcd(32, 100) = 4 (3 + 4 bits per weight)."""
    with pytest.raises(ValueError, match=r"gcd\(32, 100\) = 4"):
        storage_bits(40, 100, QuantScheme(bits=3, group_size=32))
    assert QuantScheme(bits=3, group_size=48).stored(160).group_size == 16  # allowed: one scale per 16 weights


def test_mixed_pass_meets_the_target_and_reports_bits(make_tiny, tiny_tokenizer):
    ids = torch.randint(0, len(tiny_tokenizer), (8, 64))
    m = make_tiny("llama")
    [rep] = apply(m, Recipe.single("mixed", target_bits=4.2, group_size=32), ids)
    chosen = rep.config["bits_per_module"]
    assert len(chosen) == 14 and set(chosen.values()) <= {2, 3, 4, 8}
    assert len(set(chosen.values())) > 1  # a real mixture at a budget between widths
    assert rep.metrics["bits_per_weight"] <= 4.2
    for name, b in chosen.items():
        assert m.get_submodule(name).scheme.bits == b
    # the uniform 3-bit model fits the same budget; the allocation predicts less error than it
    m3 = make_tiny("llama")
    [rep3] = apply(m3, Recipe.single("mixed", target_bits=4.2, group_size=32, candidates=(3,)), ids)
    assert rep3.metrics["layers_at_3_bits"] == 14
    assert rep.metrics["predicted_error"] < rep3.metrics["predicted_error"]


def test_cli_target_bits(model_dir, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(model_dir), "--target-bits", "4.5", "--group-size", "32",
                                 "--calib-samples", "4", "--calib-seq-len", "64", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "compress.json").read_text())["reports"][0]
    assert rep["name"] == "mixed" and rep["metrics"]["bits_per_weight"] <= 4.5
    r = CliRunner().invoke(cli, ["quantize", str(model_dir), "--target-bits", "4", "--method", "awq",
                                 "--out", str(tmp_path / "p")])
    assert r.exit_code != 0 and "does not combine" in r.output


def test_method_presets_are_the_recipes_files(tmp_path):
    """--method resolves to recipes/METHOD.yaml (a chain) or a single pass; the options fill every step."""
    from compress.cli.quantize import DEFAULT_METHOD
    from compress.recipe import PRESETS

    assert DEFAULT_METHOD == "awq+gptq" and (PRESETS / "awq+gptq.yaml").is_file()
    assert [s.name for s in Recipe.for_method("awq+gptq").steps] == ["awq", "gptq"]
    assert [s.name for s in Recipe.for_method("gptq", bits=4).steps] == ["gptq"]
    chain = Recipe.for_method("awq+gptq", bits=3, group_size=64, symmetric=False)
    assert chain.steps[0].config.quantize is False
    assert all((s.config.bits, s.config.group_size, s.config.symmetric) == (3, 64, False) for s in chain.steps)
    with pytest.raises(ValueError, match="unknown method 'nope'.*awq\\+gptq"):
        Recipe.for_method("nope")
