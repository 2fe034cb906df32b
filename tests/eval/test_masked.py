"""Encoders are scored by pseudo-perplexity (eval.masked): each token masked in turn, scored given the rest of
its window; the number is checked against a one-position-at-a-time computation, and the gate compares an encoder
and its compressed artifact on it like perplexity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from test_arch_matrix import make_arch_model

from compress.cli import cli
from compress.models import load_model
from eval import masked
from eval.masked import MaskedLMBackend


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("bert")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"mask_token": "<mask>", "cls_token": "<cls>", "sep_token": "<sep>"})
    make_arch_model("bert", len(tok) + 8).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_pseudo_log_likelihood_is_each_token_masked_alone(bert_dir, monkeypatch):
    lm = load_model(bert_dir)
    tok = lm.tokenizer
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    want = torch.empty(2, 11, dtype=torch.float64)
    with torch.no_grad():
        for b in range(2):
            row = [tok.cls_token_id, *ids[b].tolist(), tok.sep_token_id]
            for i in range(1, 12):  # the first token is context only, as in causal perplexity
                masked_row = list(row)
                masked_row[i + 1] = tok.mask_token_id
                logp = torch.log_softmax(lm.model(input_ids=torch.tensor([masked_row])).logits[0, i + 1], -1)
                want[b, i - 1] = -float(logp[ids[b, i]])
    backend = MaskedLMBackend(lm.model, tok)
    assert torch.allclose(backend.token_nll(ids), want, atol=1e-5)
    monkeypatch.setattr(masked, "ROWS_BYTES", 1)  # one masked copy per forward: the same numbers
    assert torch.allclose(backend.token_nll(ids), want, atol=1e-5)


def test_eval_and_gate_an_encoder_and_its_int4_artifact(bert_dir, tmp_path):
    run = CliRunner().invoke
    art = tmp_path / "rtn"
    r = run(cli, ["quantize", str(bert_dir), "--method", "rtn", "--group-size", "32", "--out", str(art)])
    assert r.exit_code == 0, r.output
    docs = {}
    for name, path in (("float", bert_dir), ("int4", art)):
        out = tmp_path / f"{name}.json"
        r = run(cli, ["eval", str(path), "--task", "wikitext2", "--windows", "2", "--seq-len", "16",
                      "--output", str(out)])
        assert r.exit_code == 0, r.output
        docs[name] = json.loads(out.read_text())["results"]["wikitext2"]
    for d in docs.values():
        assert d["metric"] == "pseudo_perplexity" and 1 < d["value"] < 1e4 and len(d["items"]) == 2
    assert docs["float"]["value"] != docs["int4"]["value"]
    r = run(cli, ["gate", str(tmp_path / "float.json"), "--baseline", str(tmp_path / "float.json")])
    assert r.exit_code == 0 and "pseudo_perplexity" in r.output, r.output
    r = run(cli, ["gate", str(tmp_path / "int4.json"), "--baseline", str(tmp_path / "float.json"),
                  "--max-ppl-rise", "1000%"])
    assert r.exit_code == 0 and f"{docs['int4']['value']:.4g}" in r.output, r.output  # the paired comparison ran


def test_multiple_choice_on_an_encoder_is_refused_in_one_line(bert_dir, tmp_path):
    r = CliRunner().invoke(cli, ["eval", str(bert_dir), "--task", "arc_easy", "--limit", "2",
                                 "--output", str(tmp_path / "mc.json")])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert r.exit_code != 0 and len(errors) == 1 and "masked LM" in errors[0], r.output
    assert not (tmp_path / "mc.json").exists()


def test_an_encoders_onnx_artifact_scores_its_pseudo_perplexity_in_onnx_runtime(bert_dir, tmp_path):
    """quantize -> export ONNX -> eval: ONNX Runtime's pseudo-perplexity, window by window, is torch's."""
    pytest.importorskip("onnxruntime")
    run = CliRunner().invoke
    for args in (["quantize", str(bert_dir), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")],
                 ["export", str(tmp_path / "q"), "--format", "onnx", "--out", str(tmp_path / "onnx")]):
        r = run(cli, args)
        assert r.exit_code == 0, r.output
    docs = {}
    for name, path in (("torch", tmp_path / "q"), ("ort", tmp_path / "onnx")):
        out = tmp_path / f"{name}.json"
        r = run(cli, ["eval", str(path), "--task", "wikitext2", "--windows", "2", "--seq-len", "16",
                      "--output", str(out)])
        assert r.exit_code == 0, r.output
        docs[name] = json.loads(out.read_text())["results"]["wikitext2"]
    assert docs["ort"]["metric"] == "pseudo_perplexity" and docs["ort"]["backend"] == "onnxruntime"
    for a, b in zip(docs["ort"]["items"], docs["torch"]["items"], strict=True):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-4)
