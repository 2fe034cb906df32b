"""A model compress does not take (an unknown model type, an encoder-decoder) is refused before any work: one line
naming the architecture and what is supported, exit status 2, nothing written. A bare encoder (no masked-LM head) is
taken: quantized, pruned and scored by embedding fidelity; what needs its logits is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import no_leftovers, refused

from compress.archs import TESTED


def _save(d, model, tokenizer):
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["unknown", "t5"])
@pytest.mark.parametrize("command", [["quantize", "--method", "rtn"], ["prune", "--sparsity", "0.5"],
                                     ["eval", "--task", "wikitext2", "--windows", "1", "--seq-len", "16"]])
def test_a_model_compress_does_not_take_is_refused_with_status_2(cli, tmp_path, tiny_tokenizer, kind, command):
    import transformers as T

    d = tmp_path / kind
    if kind == "unknown":  # a model type this transformers has never heard of, with weights beside it
        _save(d, T.LlamaForCausalLM(T.LlamaConfig(vocab_size=520, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2)), tiny_tokenizer)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama9000"}))
        words = ["llama9000", "not one transformers knows"]
    else:
        _save(d, T.T5ForConditionalGeneration(T.T5Config(vocab_size=520, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                         num_heads=2)), tiny_tokenizer)
        words = ["'t5'", "encoder-decoder"]
    out = tmp_path / "out"
    args = [*command[:1], d, *command[1:]]
    args += ["--output", tmp_path / "out"] if command[0] == "eval" else ["--out", out]
    line = refused(cli(*args), *words, "decoder-only", code=2)
    assert all(a in line for a in TESTED)
    no_leftovers(out)


def test_every_tested_architecture_is_in_the_matrix():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_arch_matrix import ARCHS, REFUSED

    assert set(TESTED) == {a for a in ARCHS if (a, "rtn") not in REFUSED}


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory, tiny_tokenizer):
    """A bare BertModel (architectures ["BertModel"], its pooler included): no masked-LM head."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=520, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=128, architectures=["BertModel"])
    return _save(tmp_path_factory.mktemp("bare-bert"), T.BertModel(cfg), tiny_tokenizer)


CAL = ["--calib-samples", "4", "--calib-seq-len", "32"]
TAKEN = {  # what a bare encoder goes through, as BertForMaskedLM does in the matrix
    "rtn": ["quantize", "--method", "rtn", "--group-size", "32"],
    "gptq": ["quantize", "--method", "gptq", "--group-size", "32", *CAL],
    "awq": ["quantize", "--method", "awq", "--group-size", "32", *CAL],
    "block_tune": ["quantize", "--method", "block_tune", "--group-size", "32", *CAL],
    "w8a8": ["quantize", "--bits", "8", "--activations", "int8", "--smoothquant", "0.5", *CAL],
    "wanda": ["prune", "--method", "wanda", "--sparsity", "0.5", *CAL],
    "sparsegpt": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *CAL],
    "prune_channels": ["prune", "--structure", "channels", "--ratio", "0.25", *CAL],
    "prune_layers": ["prune", "--structure", "layers", "--ratio", "0.5", *CAL],
}


@pytest.mark.parametrize("column", TAKEN)
def test_a_bare_encoder_goes_through_the_passes_and_is_scored(cli, bare_bert, tmp_path, column):
    from compress.models import load_model

    out = tmp_path / "out"
    cmd = TAKEN[column]
    o = cli(cmd[0], bare_bert, *cmd[1:], "--out", out)
    assert o.code == 0 and o.traceback is None, o.text
    model = load_model(out).model
    assert type(model).__name__ == "BertModel"
    # the pooler (a classification head over [CLS], outside the encoder blocks) stays float by default
    assert type(model.pooler.dense) is torch.nn.Linear
    assert torch.equal(model.pooler.dense.weight, load_model(bare_bert).model.pooler.dense.weight)
    with torch.no_grad():
        h = model(input_ids=torch.tensor([[5, 6, 70, 8, 9]])).last_hidden_state
    assert h.shape == (1, 5, 64) and torch.isfinite(h).all()
    o = cli("eval", out, "--task", "wikitext2", "--windows", "2", "--seq-len", "16", "--output", tmp_path / "r.json")
    assert o.code == 0, o.text
    r = json.loads((tmp_path / "r.json").read_text())["results"]["wikitext2"]
    assert r["metric"] == "embedding_cosine" and r["reference"]["path"] == str(bare_bert)
    assert 0 < r["value"] < 1  # compressed: not the float model's embeddings, and close enough to point its way


NEEDS_HEAD = {  # command -> (exit status, words of its one-line refusal)
    "distill": (["distill", "--student-layers", "1", "--steps", "2", "--seq-len", "16"], 2,
                "distill (logit distillation) needs a language-model head"),
    "prune_layers loss": (["prune", "--structure", "layers", "--ratio", "0.5", "--importance", "loss", *CAL], 2,
                          "calibration loss) needs a language-model head"),
    "multiple choice": (["eval", "--task", "arc_easy", "--limit", "2"], 2, "language-model head"),
    "prune_heads": (["prune", "--structure", "heads", "--ratio", "0.5", *CAL], (1, 2), "head size"),
    "onnx": (["export", "--format", "onnx"], (1, 2), "'bert'"),
    "gguf": (["export", "--format", "gguf"], (1, 2), "'bert'"),
}


@pytest.mark.parametrize("what", NEEDS_HEAD)
def test_what_needs_logits_is_refused_on_a_bare_encoder(cli, bare_bert, tmp_path, what):
    cmd, code, words = NEEDS_HEAD[what]
    out = tmp_path / "out"
    if cmd[0] == "distill":  # the student is made from the teacher
        args = [cmd[0], "--teacher", bare_bert, *cmd[1:], "--out", out]
    else:
        args = [cmd[0], bare_bert, *cmd[1:], "--output" if cmd[0] == "eval" else "--out", out]
    refused(cli(*args), words, code=code)
    no_leftovers(out)
