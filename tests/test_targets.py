import pytest
from torch import nn

from compress import targets as tg


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(4, 10)


def test_default_selects_linears_but_not_lm_head():
    names = list(tg.select(Net()))
    assert names == ["layers.0.q_proj", "layers.0.k_proj", "layers.1.q_proj", "layers.1.k_proj"]


def test_exact_name_class_and_regex():
    net = Net()
    assert list(tg.select(net, ["layers.1.k_proj"], [])) == ["layers.1.k_proj"]
    assert list(tg.select(net, ["LayerNorm"], [])) == ["layers.0.norm", "layers.1.norm"]
    assert list(tg.select(net, ["re:.*q_proj"], [])) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert list(tg.select(net, ["Linear"], ["re:layers\\.0\\.", "lm_head"])) == ["layers.1.q_proj", "layers.1.k_proj"]
    assert "lm_head" in tg.select(net, ["Linear"], [])


def test_no_match_is_an_error_not_a_no_op():
    with pytest.raises(ValueError, match="matched no module"):
        tg.select(Net(), ["Conv2d"])


def test_bad_regex_rejected():
    with pytest.raises(ValueError, match="bad regular expression"):
        tg.validate_patterns(["re:[unclosed"], "targets")


def test_kinds_skip_regex_matches_but_reject_exact_names():
    net = Net()
    assert list(tg.select(net, ["re:layers\\.0\\."], [], kinds=(nn.Linear,))) == ["layers.0.q_proj", "layers.0.k_proj"]
    with pytest.raises(ValueError, match="is a LayerNorm"):
        tg.select(net, ["layers.0.norm"], [], kinds=(nn.Linear,))


def test_fused_expert_weights_are_refused_not_left_float():
    """transformers 5 keeps MoE experts as 3-D parameters, invisible to a Linear selection: refuse, naming them."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=r"fused 3-D tensors \(model.layers.0.mlp.experts and 1 more"):
        tg.select(model, kinds=(nn.Linear,))
