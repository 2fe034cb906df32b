import torch
from torch import nn

from calibrate.blocks import BlockInputs, decoder_blocks
from calibrate.capture import capture_first_block_inputs
from calibrate.fold import Fold, find_producers, fold, scale_consumer
from calibrate.replay import BlockReplay

EXPECTED = {
    # tiny llama has grouped KV heads (v: 32 outputs, o: 64 inputs), so o_proj has no fold target
    "llama": {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": None,
              "mlp.gate_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.up_proj"},
    "opt": {"self_attn.q_proj": "self_attn_layer_norm", "self_attn.out_proj": "self_attn.v_proj",
            "fc1": "final_layer_norm", "fc2": "fc1"},
}


def _block(make_tiny, tiny_tokenizer, arch):
    model = make_tiny(arch)
    ids = torch.randint(0, len(tiny_tokenizer), (4, 16))
    inputs = capture_first_block_inputs(model, ids, batch_size=2)
    _, blocks = decoder_blocks(model)
    mods = {n: m for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    # order the stage members as in EXPECTED (stage leads are their first module)
    return blocks[0], inputs, mods, BlockReplay(blocks[0], inputs, mods).stages


def test_producers_found_by_testing_the_block(make_tiny, tiny_tokenizer, arch):
    block, inputs, mods, stages = _block(make_tiny, tiny_tokenizer, arch)
    assert _names(find_producers(block, inputs, stages, mods)) == EXPECTED[arch]


def _names(found):
    assert all(f is None or f.offset == 0 for f in found.values())  # plain norms and Linears
    return {k: f and f.name for k, f in found.items()}


def test_folding_a_scale_keeps_the_block_output(make_tiny, tiny_tokenizer, arch):
    block, inputs, mods, stages = _block(make_tiny, tiny_tokenizer, arch)
    producers = find_producers(block, inputs, stages, mods)
    with torch.no_grad():
        before = block(inputs.hidden[0], **inputs.kwargs[0])[0]
        for st in stages:
            if producers[st[0]] is None:
                continue
            s = torch.rand(mods[st[0]].in_features) * 3 + 0.25
            fold(block, producers[st[0]], s)
            for n in st:
                scale_consumer(mods[n], s)
        after = block(inputs.hidden[0], **inputs.kwargs[0])[0]
    assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max()))
    assert not torch.equal(after, before)  # the weights did change


class _OnePlusNorm(nn.Module):
    """Gemma-style RMSNorm, output (1 + weight) * x_hat: dividing `weight` does not scale the output."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _Toy(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm, self.up, self.gate, self.down = norm, nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.norm(x)
        return (self.down(torch.tanh(self.gate(h)) * torch.tanh(self.up(h))),)


def test_non_homogeneous_paths_are_rejected_and_one_plus_norms_fold_in_their_form():
    x = torch.randn(2, 5, 8)
    for norm, want in ((nn.LayerNorm(8), Fold("norm", 0.0)), (_OnePlusNorm(8), Fold("norm", 1.0))):
        toy = _Toy(norm)
        with torch.no_grad():
            norm.weight.uniform_(-0.5, 0.5)
        mods = {"up": toy.up, "gate": toy.gate, "down": toy.down}
        got = find_producers(toy, BlockInputs([x], [{}]), [["gate", "up"], ["down"]], mods)
        # tanh(up) * tanh(gate) is not homogeneous in up's output: down has no producer
        assert got == {"gate": want, "down": None}
        with torch.no_grad():
            before = toy(x)[0]
            s = torch.rand(8) * 3 + 0.25
            fold(toy, got["gate"], s)
            scale_consumer(toy.gate, s)
            scale_consumer(toy.up, s)
            assert torch.allclose(toy(x)[0], before, atol=1e-5)


def test_blocks_of_one_kind_have_the_same_producers(make_tiny, tiny_tokenizer, arch):
    # AWQ tests the fold targets on the first block of a kind and reuses them for the others
    from calibrate.blocks import run_block

    model = make_tiny(arch)
    inputs = capture_first_block_inputs(model, torch.randint(0, len(tiny_tokenizer), (4, 16)), batch_size=2)
    _, blocks = decoder_blocks(model)
    found = []
    for block in blocks:
        mods = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        found.append(find_producers(block, inputs, BlockReplay(block, inputs, mods).stages, mods))
        run_block(block, inputs)
    assert len(found) > 1 and all(_names(f) == EXPECTED[arch] for f in found)
