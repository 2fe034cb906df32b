import json

import numpy as np
import pytest
from click.testing import CliRunner

from compress.cli import cli
from eval import results
from eval.gate import GateConfig, compare, junit_xml, markdown


def _ppl_doc(nll, tokens=100, windows=None):
    nll = np.asarray(nll, float)
    return {"schema": results.SCHEMA, "model": {"name": "m", "path": "/m", "bytes_on_disk": 1, "bits_per_parameter": 4},
            "results": {"wikitext2": {
                "metric": "perplexity", "value": float(np.exp(nll.sum() / (tokens * len(nll)))), "ci95": [0, 0],
                "protocol": {"seq_len": 1024, "windows": windows or len(nll), "tokens_sha256": "abc"},
                "items": [{"id": f"window {i}", "nll": float(x), "tokens": tokens} for i, x in enumerate(nll)]}}}


def _acc_doc(correct):
    return {"schema": results.SCHEMA, "model": {"name": "m"},
            "results": {"arc_easy": {
                "metric": "accuracy", "value": float(np.mean(correct)), "ci95": [0, 1],
                "protocol": {"scoring": "cloze", "shots": 0},
                "items": [{"id": f"q{i}", "choice": 0, "answer": 0, "correct": bool(c)} for i, c in enumerate(correct)]}}}


BASE = np.random.default_rng(0).normal(300, 30, 64)


def test_identical_candidate_passes():
    r = compare(_ppl_doc(BASE), _ppl_doc(BASE))
    assert r.passed and r.rows[0].paired.change == 0
    assert "PASSED" in markdown(r) and 'failures="0"' in junit_xml(r)


def test_planted_regression_fails_and_noise_does_not():
    bad = compare(_ppl_doc(BASE * 1.05), _ppl_doc(BASE), GateConfig(max_ppl_rise=0.05))
    assert not bad.passed and bad.rows[0].paired.change > 0.05
    assert "FAIL" in markdown(bad) and "<failure" in junit_xml(bad)
    # a rise beyond the threshold that is not significant passes, and says why
    noisy = BASE + np.random.default_rng(5).normal(0, 40, 64)
    r = compare(_ppl_doc(noisy), _ppl_doc(BASE), GateConfig(max_ppl_rise=0.0))
    if r.rows[0].paired.change > 0:
        assert r.rows[0].paired.p_value >= 0.05 and r.passed and "not significant" in r.rows[0].note
    # with significance 1 any change past the threshold fails
    assert not compare(_ppl_doc(BASE + 1), _ppl_doc(BASE), GateConfig(max_ppl_rise=0.0, significance=1)).passed


def test_accuracy_gate_uses_mcnemar():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.6
    worse = base.copy()
    worse[np.flatnonzero(base)[:30]] = False  # 30 questions lost, none gained: -7.5 points
    r = compare(_acc_doc(worse), _acc_doc(base), GateConfig(max_acc_drop=1.0))
    assert not r.passed and r.rows[0].paired.change == pytest.approx(7.5) and r.rows[0].paired.p_value < 1e-6
    assert compare(_acc_doc(base), _acc_doc(base)).passed


def test_mismatches_are_errors():
    with pytest.raises(ValueError, match="different protocols"):
        compare(_ppl_doc(BASE, windows=32), _ppl_doc(BASE))
    with pytest.raises(ValueError, match="different items"):
        compare(_ppl_doc(BASE[:32], windows=64), _ppl_doc(BASE))
    with pytest.raises(ValueError, match="no result for task"):
        compare(_acc_doc([True]), _ppl_doc(BASE))


def test_gate_cli_exit_codes_summary_and_junit(tmp_path, monkeypatch):
    base, same, bad, other = (tmp_path / f"{n}.json" for n in ("base", "same", "bad", "other"))
    base.write_text(json.dumps(_ppl_doc(BASE)))
    same.write_text(json.dumps(_ppl_doc(BASE)))
    bad.write_text(json.dumps(_ppl_doc(BASE * 1.2)))
    other.write_text(json.dumps(_ppl_doc(BASE, windows=8)))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    runner = CliRunner()
    r = runner.invoke(cli, ["gate", str(same), "--baseline", str(base)])
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output and "PASSED" in summary.read_text()
    junit = tmp_path / "gate.xml"
    r = runner.invoke(cli, ["gate", str(bad), "--baseline", str(base), "--max-ppl-rise", "5%", "--junit", str(junit)])
    assert r.exit_code == 1 and "FAILED" in r.output
    assert 'failures="1"' in junit.read_text()
    r = runner.invoke(cli, ["gate", str(other), "--baseline", str(base)])
    assert r.exit_code == 2 and "different protocols" in r.output
    (tmp_path / "junk.json").write_text("{not json")
    r = runner.invoke(cli, ["gate", str(tmp_path / "junk.json"), "--baseline", str(base)])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    r = runner.invoke(cli, ["gate", str(same), "--baseline", str(base), "--max-ppl-rise", "lots"])
    assert r.exit_code == 2 and "percentage" in r.output


def test_eval_then_gate_on_a_tiny_model(model_dir, tmp_path):
    """compress eval writes results files that compress gate reads; a damaged model fails the gate."""
    from safetensors.torch import load_file, save_file

    runner = CliRunner()
    opts = ["--task", "wikitext2", "--windows", "6", "--seq-len", "128", "--threads", "1"]
    base, same = tmp_path / "base.json", tmp_path / "same.json"
    for out in (base, same):
        r = runner.invoke(cli, ["eval", str(model_dir), *opts, "--output", str(out)])
        assert r.exit_code == 0, r.output
    doc = json.loads(base.read_text())
    assert doc["schema"] == results.SCHEMA and doc["model"]["sha256"] and doc["model"]["parameters"] > 0
    assert len(doc["results"]["wikitext2"]["items"]) == 6
    assert runner.invoke(cli, ["gate", str(same), "--baseline", str(base)]).exit_code == 0
    # damage (the model is random, so removing parts of it can even help): token embeddings x4,
    # which sharpens its (wrong) predictions
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            t = load_file(f)
            key = next(k for k in t if k.endswith("embed_tokens.weight"))
            t[key].mul_(4)
            save_file(t, str(bad_dir / f.name), metadata={"format": "pt"})
        else:
            (bad_dir / f.name).write_bytes(f.read_bytes())
    bad = tmp_path / "bad.json"
    assert runner.invoke(cli, ["eval", str(bad_dir), *opts, "--output", str(bad)]).exit_code == 0
    r = runner.invoke(cli, ["gate", str(bad), "--baseline", str(base), "--max-ppl-rise", "0.5%"])
    assert r.exit_code == 1, r.output
    # a different protocol is refused, not compared
    other = tmp_path / "other.json"
    assert runner.invoke(cli, ["eval", str(model_dir), *opts[:-4], "--seq-len", "64", "--threads", "1",
                               "--output", str(other)]).exit_code == 0
    r = runner.invoke(cli, ["gate", str(other), "--baseline", str(base)])
    assert r.exit_code == 2 and "different protocols" in r.output


def test_dtype_is_part_of_the_protocol(model_dir, tmp_path):
    """An eval in bfloat16 records it; the gate refuses to compare it with a float32 run."""
    runner = CliRunner()
    opts = ["--task", "wikitext2", "--windows", "2", "--seq-len", "64", "--threads", "1"]
    f32, b16 = tmp_path / "f32.json", tmp_path / "b16.json"
    assert runner.invoke(cli, ["eval", str(model_dir), *opts, "--output", str(f32)]).exit_code == 0
    r = runner.invoke(cli, ["eval", str(model_dir), *opts, "--dtype", "bfloat16", "--output", str(b16)])
    assert r.exit_code == 0, r.output
    assert json.loads(f32.read_text())["results"]["wikitext2"]["protocol"]["dtype"] == "float32"
    assert json.loads(b16.read_text())["results"]["wikitext2"]["protocol"]["dtype"] == "bfloat16"
    r = runner.invoke(cli, ["gate", str(b16), "--baseline", str(f32)])
    assert r.exit_code == 2 and "dtype" in r.output
    # a results file from before protocols carried the dtype was float32
    assert compare(_ppl_doc(BASE), {**_ppl_doc(BASE), "results": {"wikitext2": {
        **_ppl_doc(BASE)["results"]["wikitext2"],
        "protocol": {**_ppl_doc(BASE)["results"]["wikitext2"]["protocol"], "dtype": "float32"}}}}).passed


def test_report_says_whether_the_artifacts_are_the_same_bytes():
    a, b = _ppl_doc(BASE), _ppl_doc(BASE)
    assert compare(a, b).same_artifact is None and "Artifacts:" not in markdown(compare(a, b))
    a["model"]["sha256"], b["model"]["sha256"] = "1" * 64, "1" * 64
    assert compare(a, b).same_artifact is True and "the same weights" in markdown(compare(a, b))
    b["model"]["sha256"] = "2" * 64
    r = compare(a, b)
    assert r.same_artifact is False and "different weights (sha256 111111111111... vs 222222222222...)" in markdown(r)
