"""`compress merge-lora`: writes the merged model, refuses bad adapters in one line with a non-zero exit."""

import json

import torch
from click.testing import CliRunner

from compress.cli import cli
from compress.models import load_model


def test_merge_lora_writes_the_merged_model(model_dirs, tmp_path, make_adapter):
    src = model_dirs["llama"]
    base = load_model(src).model
    want = make_adapter(base, tmp_path / "a", r=4, lora_alpha=8)
    r = CliRunner().invoke(cli, ["merge-lora", str(src), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert summary["reports"][0]["modules"] == 6
    got = load_model(tmp_path / "m").model.state_dict()
    assert max(float((got[k] - v).abs().max()) for k, v in want.state_dict().items()) <= 1e-6


def test_merge_lora_refuses_a_mismatched_adapter(model_dirs, tmp_path, make_adapter):
    make_adapter(load_model(model_dirs["llama"]).model, tmp_path / "a", r=4, lora_alpha=8)
    r = CliRunner().invoke(cli, ["merge-lora", str(model_dirs["opt"]), "--adapter", str(tmp_path / "a"),
                                 "--out", str(tmp_path / "m")])
    assert r.exit_code == 1
    assert "target module model.layers.0.mlp.down_proj is not in the model" in r.output
    assert not (tmp_path / "m").exists()  # nothing half-written
    r = CliRunner().invoke(cli, ["merge-lora", str(model_dirs["llama"]), "--adapter", str(tmp_path / "a"),
                                 "--weights", "0.5,x", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "comma-separated numbers" in r.output


def test_merge_lora_as_a_recipe_step_then_quantize(model_dirs, tmp_path, make_adapter):
    src = model_dirs["llama"]
    make_adapter(load_model(src).model, tmp_path / "a", r=4, lora_alpha=8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"- pass: lora_merge\n  adapters: [{tmp_path / 'a'}]\n- pass: rtn\n  bits: 4\n  group_size: 32\n")
    r = CliRunner().invoke(cli, ["run", str(recipe), str(src), "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    m = load_model(tmp_path / "q").model
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert torch.isfinite(m(torch.tensor([[5, 6, 7]])).logits).all()


def test_merge_lora_into_an_artifact_tunes_the_scales(model_dirs, tmp_path, make_adapter):
    """Into a packed artifact: re-quantized, then the scales tuned (reported on the console), or not with 0."""
    src = model_dirs["llama"]
    make_adapter(load_model(src).model, tmp_path / "a", r=4, lora_alpha=8)
    calib = ["--calib-samples", "32", "--calib-seq-len", "64"]
    r = CliRunner().invoke(cli, ["quantize", str(src), "--bits", "4", "--group-size", "32", "--method", "rtn",
                                 *calib, "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    outs = {}
    for steps in ("16", "0"):
        r = CliRunner().invoke(cli, ["merge-lora", str(tmp_path / "q"), "--adapter", str(tmp_path / "a"), *calib,
                                     "--tune-steps", steps, "--out", str(tmp_path / f"m{steps}")])
        assert r.exit_code == 0, r.output
        outs[steps] = json.loads(r.output[r.output.index("{"):])["reports"]
        assert ("scale tuning: KL to the float merge" in " ".join(r.output.split())) == (steps != "0")
    assert [r["name"] for r in outs["16"]] == ["lora_merge", "scale_tune"] and len(outs["0"]) == 1
    tuned = outs["16"][1]
    assert tuned["config"]["steps"] == 16 and tuned["config"]["reference"] == str(tmp_path / "q")
    assert tuned["modules"] == 6  # the re-quantized ones: the others are packed in the reference too
    a, b = load_model(tmp_path / "m16").model, load_model(tmp_path / "m0").model
    q_a, q_b = a.model.layers[0].self_attn.q_proj, b.model.layers[0].self_attn.q_proj
    assert torch.equal(q_a.codes(), q_b.codes())  # the same re-quantization; only the scales differ
    assert (tuned["metrics"]["kept"] == 1.0) == (not torch.equal(q_a.weight_scale, q_b.weight_scale))
