import json

import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_passes_lists_rtn_with_defaults(runner):
    r = runner.invoke(cli, ["passes"])
    assert r.exit_code == 0, r.output
    assert "rtn:" in r.output and "group_size = 128  # input columns per scale" in r.output
    assert "ignore = lm_head, re:(lm_head|cls|pooler)\\.  # replaces the default" in r.output and "scale_tune" in r.output


def test_help_and_passes_show_the_configs_defaults_and_comments(runner):
    """Generated options: `compress distill --help` and `compress passes` show each DistillConfig field's
    default and comment, because both are read from the dataclass."""
    import dataclasses

    from compress.cli.options import default_of, field_comments, show_default
    from compress.distill.kd import DistillConfig

    helptext = " ".join(runner.invoke(cli, ["distill", "--help"]).output.split())
    lines = runner.invoke(cli, ["passes"]).output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("distill:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    "))
    listing = "\n".join(lines[start + 1:end])  # the distill pass's fields
    comments = field_comments(DistillConfig)
    assert len(comments) >= 25
    for f in dataclasses.fields(DistillConfig):
        flag = "--train-seed" if f.name == "seed" else "--" + f.name.replace("_", "-")
        shown = show_default(default_of(f))
        assert flag in helptext and f"[default: {shown}]" in helptext, f.name
        assert f"    {f.name} = {shown}" in listing, f.name
        if f.name in comments and f.name != "teacher":  # (the command words the teacher's default itself)
            assert " ".join(comments[f.name].split()) in helptext and comments[f.name] in listing, f.name
    assert "--divergence [forward|reverse|js]" in helptext  # a Literal field is a choice


def test_quantize_then_eval_artifact(runner, model_dir, tmp_path):
    out = tmp_path / "q"
    r = runner.invoke(cli, ["quantize", str(model_dir), "--bits", "4", "--group-size", "32", "--asym", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["reports"][0]["config"]["symmetric"] is False
    assert (out / "compress.json").is_file()
    res = tmp_path / "res.json"
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    r = runner.invoke(cli, ["eval", str(out), "--task", "wikitext2", "--task", f"text:{text}",
                            "--windows", "2", "--seq-len", "64", "--output", str(res)])
    assert r.exit_code == 0, r.output
    doc = json.loads(res.read_text())
    assert doc["results"]["wikitext2"]["windows"] == 2
    assert doc["results"]["wikitext2"]["protocol"]["seq_len"] == 64
    assert doc["results"][f"text:{text}"]["perplexity"] > 1
    # refuses to overwrite
    r = runner.invoke(cli, ["quantize", str(model_dir), "--out", str(out)])
    assert r.exit_code == 1 and "--force" in r.output


def test_run_recipe_validates_before_loading(runner, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- pass: rtn\n  bitz: 4\n")
    r = runner.invoke(cli, ["run", str(recipe), str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "unknown key 'bitz'; valid keys: bits" in r.output and "no-such-model" not in r.output
    recipe.write_text("- pass: awqq\n")
    r = runner.invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "known: " in r.output and "rtn" in r.output


def test_run_recipe_writes_artifact(runner, model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- pass: rtn\n  bits: 8\n  group_size: -1\n")
    r = runner.invoke(cli, ["run", str(recipe), str(model_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "o" / "compress.json").read_text())
    assert prov["recipe"][0]["bits"] == 8


def test_missing_model_is_one_line_error(runner, tmp_path):
    r = runner.invoke(cli, ["eval", str(tmp_path / "missing")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"Error: model path not found: {tmp_path / 'missing'}"]


def test_bin_checkpoint_refused_in_one_line(runner, model_dir, tmp_path):
    from compress.models import load_model

    lm = load_model(model_dir)
    d = tmp_path / "pickled"
    d.mkdir()  # a pickled checkpoint (transformers 5 saves only safetensors)
    torch.save(lm.model.state_dict(), d / "pytorch_model.bin")
    lm.model.config.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    r = runner.invoke(cli, ["eval", str(d), "--windows", "1", "--seq-len", "32"])
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1 and "--allow-pickle" in r.output


def test_bad_option_values(runner, tmp_path):
    r = runner.invoke(cli, ["quantize", "--bits", "5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'5' is not one of" in r.output
    r = runner.invoke(cli, ["eval", "--windows", "0"])
    assert r.exit_code == 1 and "windows must be" in r.output


def test_quantize_gptq_with_calibration_options(runner, model_dir, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Sample {i}: the river flows past the old mill. " * 8})
                               for i in range(20)))
    out = tmp_path / "g"
    r = runner.invoke(cli, ["quantize", str(model_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
                            "--calib", f"{str(calib)[:-6]}.jsonl:text", "--calib-samples", "4",
                            "--calib-seq-len", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["calibration"]["samples"] == 4
    assert summary["reports"][0]["config"]["calibration_tokens"] == 4 * 32
    r = runner.invoke(cli, ["quantize", str(model_dir), "--method", "gptq", "--calib", str(tmp_path / "none.txt"),
                            "--out", str(tmp_path / "h")])
    assert r.exit_code == 1 and "calibration source not found" in r.output


def test_quantize_tune_steps(runner, model_dir, tmp_path):
    """--tune-steps adds a scale_tune step whose reference is the input model (after any weight quantizer);
    W8A8 refuses it."""
    r = runner.invoke(cli, ["quantize", str(model_dir), "--method", "gptq", "--calib-samples", "4", "--calib-seq-len",
                            "32", "--tune-steps", "2", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    reports = json.loads((tmp_path / "g" / "compress.json").read_text())["reports"]
    assert [r["name"] for r in reports] == ["gptq", "scale_tune"]
    rep = reports[1]
    assert rep["config"]["steps"] == 2 and rep["config"]["reference"] == str(model_dir) and "kl_before" in rep["metrics"]
    assert rep["modules"] == reports[0]["modules"] > 0  # every module gptq packed
    r = runner.invoke(cli, ["quantize", str(model_dir), "--bits", "8", "--activations", "int8", "--tune-steps", "2",
                            "--out", str(tmp_path / "w")])
    assert r.exit_code == 2 and "--tune-steps" in r.output and not (tmp_path / "w").exists()


def test_calibration_windows_fit_a_short_model(runner, model_dir, tmp_path):
    """The tiny models have 256 positions; the default 512-token calibration windows are shortened."""
    r = runner.invoke(cli, ["quantize", str(model_dir), "--method", "gptq", "--calib-samples", "4",
                            "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "g" / "compress.json").read_text())["reports"][0]
    assert rep["config"]["calibration_tokens"] == 4 * 256


def test_prune_writes_a_sparse_model_that_quantizes(runner, model_dir, tmp_path):
    out = tmp_path / "p"
    r = runner.invoke(cli, ["prune", str(model_dir), "--method", "wanda", "--pattern", "2:4", "--calib-samples", "4",
                            "--calib-seq-len", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["reports"][0]["config"]["pattern"] == "2:4"
    assert summary["reports"][0]["metrics"]["sparsity"] == 0.5
    r = runner.invoke(cli, ["quantize", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
                            "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    from compress.models import load_model
    from compress.prune.sparsity import check_n_m
    from compress.quantize.qlinear import QuantLinear

    q = [m for m in load_model(tmp_path / "q").model.modules() if isinstance(m, QuantLinear)]
    assert q and all(check_n_m(m.dequantize_weight(), (2, 4)) for m in q)


def test_prune_option_errors(runner, model_dir, tmp_path):
    for args, msg in ((["--pattern", "4:2"], "0 < N < M"), (["--sparsity", "0.3", "--pattern", "2:4"], "contradicts"),
                      (["--sparsity", "1.5"], "[0, 1)"), (["--method", "obs"], "Invalid value for '--method'")):
        r = runner.invoke(cli, ["prune", str(model_dir), *args, "--out", str(tmp_path / "o")])
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
        assert not (tmp_path / "o").exists()


def test_prune_structure_gives_a_smaller_model(runner, model_dirs, tmp_path):
    out = tmp_path / "s"
    r = runner.invoke(cli, ["prune", str(model_dirs["llama"]), "--structure", "channels", "--ratio", "0.5",
                            "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 80
    r = runner.invoke(cli, ["prune", str(model_dirs["llama"]), "--structure", "layers", "--pattern", "2:4",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--pattern do not apply to --structure layers" in r.output
    r = runner.invoke(cli, ["prune", str(model_dirs["llama"]), "--ratio", "0.5", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--ratio apply to --structure only" in r.output
