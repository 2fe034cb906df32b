"""The one block walk: which blocks a pass sees, what its statistics see, what feeds the next block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from calibrate.blocks import BlockInputs, decoder_blocks, run_block
from calibrate.capture import capture_first_block_inputs
from calibrate.replay import BlockReplay
from calibrate.stats import ChannelStats
from calibrate.walk import Block, block_linears, walk
from compress import targets as tg


def _ids(tokenizer, n=4, seq=16):
    return torch.randint(0, len(tokenizer), (n, seq), generator=torch.Generator().manual_seed(0))


def test_walk_visits_the_selected_blocks_in_order_and_feeds_each_the_last_ones_output(make_tiny, tiny_tokenizer):
    model = make_tiny("llama")
    ids = _ids(tiny_tokenizer)
    selected = tg.select(model, ["re:model\\.layers\\.1\\.mlp\\..*"], [], kinds=(nn.Linear,))
    expected = capture_first_block_inputs(model, ids, batch_size=2)
    run_block(decoder_blocks(model)[1][0], expected)  # block 1's inputs: block 0's outputs
    seen, after, progress = [], [], []

    def visit(block: Block) -> None:
        assert block.prefix == "model.layers.1." and sorted(block.modules) == ["mlp.down_proj", "mlp.gate_proj",
                                                                                "mlp.up_proj"]
        assert block.stages == [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        for got, want in zip(block.inputs.hidden, expected.hidden, strict=True):
            assert torch.equal(got, want)
        seen.append(block.index)

    walk(model, selected, ids, visit, label="t", batch_size=2, forward_dtype="float32",
         progress=lambda *a: progress.append(a), after=lambda m: after.append(m))
    assert seen == [1]
    assert after == list(decoder_blocks(model)[1]) and progress == [("t", 1, 2), ("t", 2, 2)]
    with pytest.raises(ValueError, match="t works inside the decoder blocks"):
        walk(model, {"lm_head": model.lm_head}, ids, visit, label="t")


@pytest.mark.parametrize("sequential", [True, False])
def test_stagewise_statistics_see_the_earlier_stages_changes(make_tiny, tiny_tokenizer, sequential):
    """Zeroing v_proj silences the attention: o_proj's input is zero when observed after that stage (sequential),
    and the float block's when all stages are observed at once."""
    model = make_tiny("llama")
    selected = {n: m for n, m in block_linears(model).items() if n.startswith("model.layers.0.")}
    norms = {}

    def visit(block: Block) -> None:
        for stage, (stats,) in block.stagewise(lambda m: (ChannelStats(m.in_features),), sequential=sequential):
            norms[stage[0]] = float(stats.l2_norm.sum())
            if "self_attn.v_proj" in stage:
                block.modules["self_attn.v_proj"].weight.data.zero_()

    walk(model, selected, _ids(tiny_tokenizer), visit, label="t", forward_dtype="float32")
    assert list(norms) == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert (norms["self_attn.o_proj"] == 0) == sequential


def test_a_module_replaced_after_its_stage_is_what_later_passes_and_the_output_use(make_tiny, tiny_tokenizer):
    """A pass may swap a finished module for another object (W8A8 does); the replay's kept tensors and the block's
    output are computed with the new module, bit for bit as a plain forward of the changed block."""
    model = make_tiny("llama")
    module = decoder_blocks(model)[1][0]
    reference = copy.deepcopy(module)
    inputs = capture_first_block_inputs(model, _ids(tiny_tokenizer), batch_size=2)
    expected = BlockInputs([h.clone() for h in inputs.hidden], inputs.kwargs)
    mods = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    block = Block(0, "model.layers.0.", module, mods, inputs, None, BlockReplay(module, inputs, mods))
    swapped = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")
    for stage, _ in block.stagewise(lambda m: ()):
        for n in stage:
            if n in swapped:
                for owner in (module, reference):
                    new = copy.deepcopy(mods[n])
                    new.weight.data.mul_(2)
                    tg.set_submodule(owner, n, new)
                mods[n].to("meta")  # the old object cannot compute any more
    block.run()
    run_block(reference, expected)
    assert block.ran and all(not block.current(n).weight.is_meta for n in swapped)
    for got, want in zip(inputs.hidden, expected.hidden, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be positive, got 0"),
    ("forward_dtype", "int8", "forward_dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
])
def test_every_calibrated_config_checks_its_forward_options(field, value, message):
    from compress.prune.sparsity import CalibratedSparsityConfig
    from compress.quantize.gptq import GPTQConfig

    for cls in (GPTQConfig, CalibratedSparsityConfig):
        with pytest.raises(ValueError, match=message):
            cls(**{field: value})


def test_a_walk_over_nothing_names_what_the_blocks_hold(make_tiny, tiny_tokenizer):
    """A model whose blocks hold no nn.Linear (GPT-2's Conv1D) is refused in one line, not a StopIteration."""
    model = make_tiny("llama")
    with pytest.raises(ValueError, match=r"prune_channels found no nn.Linear .* \(their layers: .*LlamaRMSNorm"):
        walk(model, {}, _ids(tiny_tokenizer), lambda block: None, label="prune_channels")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_every_block_gets_its_own_layer_types_mask_and_rope(arch, tiny_tokenizer):
    """Gemma 2/3 alternate sliding-window and full attention (Gemma 3 with other RoPE too): the walk must hand
    each block the arguments the model gives it, so every block sees the true model's hidden states."""
    import transformers

    torch.manual_seed(0)
    cls = {"gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig}[arch]
    cfg = cls(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
              sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = _ids(tiny_tokenizer, n=2, seq=32)  # longer than the window: the two masks differ
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = []

    def visit(block: Block) -> None:
        assert torch.allclose(torch.cat(block.inputs.hidden), want[block.index], atol=1e-5), block.index
        seen.append(block.index)

    walk(model, block_linears(model), ids, visit, label="t", batch_size=2, forward_dtype="float32")
    assert seen == [0, 1, 2, 3]
