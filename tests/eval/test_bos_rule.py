"""Perplexity follows the tokenizer's BOS default (as multiple choice and lm-evaluation-harness do), records the
choice in the protocol, and the gate refuses to compare results scored under different choices."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from compress.cli import cli
from compress.data import wikitext2_path
from eval.backends import TorchBackend
from eval.perplexity import PerplexityConfig, wikitext2


@pytest.fixture
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, adding <s> before every text by default (as Llama's and Gemma's do)."""
    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("a").input_ids[0] == bos
    return tok


def test_a_tokenizer_that_adds_bos_gets_it_in_perplexity_and_the_protocol_says_so(make_tiny, bos_tokenizer):
    model = make_tiny("llama")
    r = wikitext2(TorchBackend(model, bos_tokenizer), PerplexityConfig(windows=2, seq_len=32))
    assert r["protocol"]["prepend_bos"] is True
    ids = torch.tensor(bos_tokenizer(wikitext2_path("test").read_text(encoding="utf-8"),
                                     add_special_tokens=False).input_ids)
    total = 0.0
    with torch.no_grad():  # each window after <s>, the window's first token context only, <s> never scored
        for w in range(2):
            x = torch.cat([torch.tensor([bos_tokenizer.bos_token_id]), ids[w * 32:(w + 1) * 32]])[None]
            total += F.cross_entropy(model(x).logits[0, 1:-1], x[0, 2:], reduction="sum").item()
    assert r["perplexity"] == pytest.approx(math.exp(total / (2 * 31)), rel=1e-6)
    off = wikitext2(TorchBackend(model, bos_tokenizer), PerplexityConfig(windows=2, seq_len=32, prepend_bos=False))
    assert off["protocol"]["prepend_bos"] is False and off["perplexity"] != r["perplexity"]


def test_the_gate_refuses_to_compare_across_the_bos_choice(model_dirs, bos_tokenizer, tmp_path):
    import shutil

    src = tmp_path / "bos-model"
    shutil.copytree(model_dirs["llama"], src)
    bos_tokenizer.save_pretrained(src)
    run = CliRunner().invoke
    for name, extra in (("default", []), ("without", ["--no-prepend-bos"])):
        r = run(cli, ["eval", str(src), "--windows", "2", "--seq-len", "32", *extra,
                      "--output", str(tmp_path / f"{name}.json")])
        assert r.exit_code == 0, r.output
    protocols = {n: json.loads((tmp_path / f"{n}.json").read_text())["results"]["wikitext2"]["protocol"]
                 for n in ("default", "without")}
    assert protocols["default"]["prepend_bos"] is True and protocols["without"]["prepend_bos"] is False
    r = run(cli, ["gate", str(tmp_path / "default.json"), "--baseline", str(tmp_path / "without.json")])
    assert r.exit_code == 2 and "different protocols" in r.output and "prepend_bos" in r.output, r.output
