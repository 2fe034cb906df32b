"""A model compress does not take (an unknown model type, a bare encoder, an encoder-decoder) is refused before any
work: one line naming the architecture and what is supported, exit status 2, nothing written."""

from __future__ import annotations

import json

import pytest
from conftest import no_leftovers, refused

from compress.archs import TESTED


def _save(d, model, tokenizer):
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["unknown", "bert", "t5"])
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
    elif kind == "bert":
        # a bare encoder (no masked-LM head: nothing to score it with); BertForMaskedLM is in the matrix
        _save(d, T.BertModel(T.BertConfig(vocab_size=520, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32)), tiny_tokenizer)
        words = ["'bert'", "encoder without a masked-language-model head"]
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
