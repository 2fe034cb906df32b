"""An encoder without a masked-LM head (a bare BertModel) is scored by embedding fidelity (eval.embedding): the
cosine of its mean-pooled embedding of each evaluation window to the float reference's. The numbers are checked
against an independent computation with transformers, and the gate compares them window by window."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from compress.cli import cli
from compress.data import wikitext2_path
from eval.gate import GateConfig
from eval.stats import paired_mean_drop

WINDOWS, SEQ = ["--windows", "3", "--seq-len", "16"], 16


def _bert(vocab: int, seed: int = 0, hidden: int = 64):
    """A tiny random BertModel (its pooler included); norms and biases moved off the 1 / 0 they start at."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, pad_token_id=2, architectures=["BertModel"])
    model = BertModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    t = copy.deepcopy(tiny_tokenizer)
    t.add_special_tokens({"mask_token": "<mask>", "cls_token": "<cls>", "sep_token": "<sep>"})
    return t


def _save(d, model, tok):
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("bare-bert"), _bert(len(tok) + 8), tok)


def _run(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifacts(bert_dir, tmp_path_factory):
    """bits -> an RTN artifact of the bare encoder (group 32)."""
    out = {}
    for bits in (2, 4, 8):
        d = tmp_path_factory.mktemp("arts") / f"w{bits}"
        r = _run("quantize", bert_dir, "--method", "rtn", "--bits", bits, "--group-size", "32", "--out", d)
        assert r.exit_code == 0, r.output
        out[bits] = d
    return out


def _eval(path, out, *extra) -> dict:
    r = _run("eval", path, "--task", "wikitext2", *WINDOWS, "--output", out, *extra)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())["results"]["wikitext2"]


def _one_error(r) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def test_a_float_encoder_against_itself_scores_one(bert_dir, tmp_path):
    own = _eval(bert_dir, tmp_path / "own.json")
    assert own["metric"] == "embedding_cosine" and own["reference"]["itself"] is True
    assert len(own["items"]) == 3 and all(it["cosine"] == pytest.approx(1.0, abs=1e-12) for it in own["items"])
    assert own["value"] == pytest.approx(1.0, abs=1e-12)
    # a second copy named as the reference: computed twice, the same embeddings
    given = _eval(bert_dir, tmp_path / "given.json", "--reference", bert_dir)
    assert given["reference"]["itself"] is False and given["value"] == pytest.approx(1.0, abs=1e-6)
    assert given["protocol"] == own["protocol"]  # the same reference (by sha256): comparable by the gate


def test_fewer_bits_lower_cosine(bert_dir, artifacts, tmp_path):
    cos = {bits: _eval(art, tmp_path / f"w{bits}.json")["value"] for bits, art in artifacts.items()}
    assert cos[2] < cos[4] < cos[8] < 1.0, cos
    assert cos[8] > 0.999 and cos[2] < 0.9999, cos


def test_per_window_cosines_match_transformers(bert_dir, artifacts, tok, tmp_path):
    """Independently: transformers (+ compressed-tensors for the artifact) loads both models with AutoModel;
    each window framed by [CLS] / [SEP], mean-pooled over every position, cosine per window."""
    from transformers import AutoModel

    res = _eval(artifacts[2], tmp_path / "w2.json")
    ids = tok(wikitext2_path("test").read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    rows = torch.tensor([[tok.cls_token_id, *ids[i * SEQ:(i + 1) * SEQ], tok.sep_token_id] for i in range(3)])
    pooled = []
    for path in (artifacts[2], bert_dir):
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            pooled.append(model(input_ids=rows).last_hidden_state.double().mean(1))  # (3, H)
    want = F.cosine_similarity(*pooled, dim=-1)
    got = torch.tensor([it["cosine"] for it in res["items"]], dtype=torch.float64)
    assert torch.allclose(1 - got, 1 - want, rtol=1e-4, atol=1e-9), (got, want)
    assert res["value"] == pytest.approx(float(want.mean()), abs=1e-9)
    lo, hi = res["ci95"]
    assert lo <= res["value"] <= hi and lo >= float(want.min()) - 1e-12 and hi <= float(want.max()) + 1e-12


def test_transformers_loads_the_bare_encoder_artifact_as_ours(artifacts):
    from transformers import AutoModel

    from compress.models import load_model

    ids = torch.tensor([[5, 17, 40, 100, 7, 300, 21]])
    theirs = AutoModel.from_pretrained(artifacts[4], dtype=torch.float32).eval()
    assert type(theirs).__name__ == "BertModel" and theirs.config.quantization_config is not None
    ours = load_model(artifacts[4]).model
    with torch.no_grad():
        a, b = ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    with torch.no_grad():
        w8 = load_model(artifacts[8]).model(input_ids=ids).last_hidden_state
    assert not torch.allclose(a, w8, atol=1e-5)  # 4 bits are not 8: the comparison can fail


def test_gate_passes_8_bit_and_fails_a_degraded_encoder(bert_dir, artifacts, tok, tmp_path):
    base, w8 = tmp_path / "float.json", tmp_path / "w8.json"
    _eval(bert_dir, base)
    _eval(artifacts[8], w8)
    # another random encoder of the same shape, scored against this one's float model: far from it
    bad = _save(tmp_path / "degraded", _bert(len(tok) + 8, seed=1), tok)
    worse = _eval(bad, tmp_path / "bad.json", "--reference", bert_dir)
    assert worse["value"] < 1 - GateConfig().max_cos_drop, worse["value"]
    r = _run("gate", w8, "--baseline", base)
    assert r.exit_code == 0 and "embedding_cosine (higher is better)" in r.output and "drop <= 0.01" in r.output, \
        r.output
    r = _run("gate", tmp_path / "bad.json", "--baseline", base)
    assert r.exit_code == 1 and "**FAIL**" in r.output and f"{worse['value']:.5f}" in r.output, r.output
    # the same 8-bit result fails a threshold below its own drop
    drop = 1 - json.loads(w8.read_text())["results"]["wikitext2"]["value"]
    r = _run("gate", w8, "--baseline", base, "--max-cos-drop", f"{drop / 10:.3g}")
    assert r.exit_code == 1 and "**FAIL**" in r.output, r.output
    r = _run("report", base, w8)
    assert r.exit_code == 0 and "embedding_cosine" in r.output, r.output


def test_paired_mean_drop_is_the_mean_per_window_drop():
    c, b = np.array([0.90, 0.80, 0.95, 0.85]), np.ones(4)
    res = paired_mean_drop(c, b)
    assert res.change == pytest.approx(0.125) and res.p_value < 0.05
    assert res.ci95[0] <= 0.125 <= res.ci95[1]
    assert paired_mean_drop(b, c).p_value == 1.0  # the candidate is better: never significant


@pytest.mark.parametrize("bad", [{"max_cos_drop": -0.01}, {"max_cos_drop": math.nan}, {"significance": 0.0}])
def test_gate_thresholds_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GateConfig(**bad)


def test_nan_cosine_results_are_refused_or_failed(bert_dir, artifacts, tmp_path):
    base, cand = tmp_path / "float.json", tmp_path / "w4.json"
    _eval(bert_dir, base)
    _eval(artifacts[4], cand)
    broken = tmp_path / "nan.json"
    doc = json.loads(cand.read_text())
    doc["results"]["wikitext2"]["items"][1]["cosine"] = math.nan
    broken.write_text(json.dumps(doc))  # json writes a bare NaN
    r = _run("gate", broken, "--baseline", base)  # a candidate with a NaN fails
    assert r.exit_code == 1 and "non-finite" in r.output, r.output
    r = _run("gate", cand, "--baseline", broken)  # a baseline with one is bad input
    assert r.exit_code == 2 and "baseline is unusable" in _one_error(r), r.output


def test_a_missing_or_replaced_reference_is_one_line_exit_2(bert_dir, tok, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bert_dir, src)
    art = tmp_path / "w4"
    assert _run("quantize", src, "--method", "rtn", "--group-size", "32", "--out", art).exit_code == 0
    shutil.rmtree(src)
    _save(src, _bert(len(tok) + 8, seed=3), tok)  # another model where the artifact's source was
    r = _run("eval", art, "--task", "wikitext2", *WINDOWS)
    assert r.exit_code == 2 and "not the model this artifact was made from" in _one_error(r), r.output
    shutil.rmtree(src)  # the float model the artifact records is gone
    r = _run("eval", art, "--task", "wikitext2", *WINDOWS, "--output", tmp_path / "r.json")
    line = _one_error(r)
    assert r.exit_code == 2 and str(src) in line and "--reference" in line, r.output
    assert not (tmp_path / "r.json").exists()
    r = _run("eval", art, "--task", "wikitext2", *WINDOWS, "--reference", tmp_path / "nowhere")
    assert r.exit_code == 2 and "nowhere" in _one_error(r), r.output
    # named explicitly, the reference replaces the recorded one
    assert _eval(art, tmp_path / "r.json", "--reference", bert_dir)["value"] < 1.0


@pytest.mark.parametrize("what", ["hidden size", "tokenizer"])
def test_a_reference_that_does_not_match_is_refused(bert_dir, tok, tiny_tokenizer, tmp_path, what):
    if what == "hidden size":
        other = _save(tmp_path / "other", _bert(len(tok) + 8, hidden=32), tok)
    else:  # the same model, a tokenizer without the special tokens
        other = _save(tmp_path / "other", _bert(len(tok) + 8), tiny_tokenizer)
    r = _run("eval", bert_dir, "--task", "wikitext2", *WINDOWS, "--reference", other)
    assert r.exit_code == 2 and what in _one_error(r), r.output


@pytest.mark.parametrize("task", ["arc_easy", "mc"])
def test_token_probabilities_are_refused_on_a_bare_encoder(bert_dir, tmp_path, task):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}) + "\n")
    r = _run("eval", bert_dir, "--task", "arc_easy" if task == "arc_easy" else f"mc:{q}", "--limit", "2",
             "--output", tmp_path / "r.json")
    assert r.exit_code == 2 and "language-model head" in _one_error(r), r.output
    assert not (tmp_path / "r.json").exists()


def test_reference_is_refused_for_a_model_scored_by_its_probabilities(model_dirs, tmp_path):
    r = _run("eval", model_dirs["llama"], "--task", "wikitext2", *WINDOWS, "--reference", model_dirs["llama"])
    assert r.exit_code != 0 and "--reference applies to encoders" in _one_error(r), r.output
