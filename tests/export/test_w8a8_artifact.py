"""W8A8 artifacts: saved and loaded exactly, exported to ONNX integer kernels, refused where they cannot go."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli
from compress.models import load_model
from compress.quantize.w8a8linear import W8A8Linear

CALIB = ["--calib-samples", "8", "--calib-seq-len", "64"]


@pytest.fixture(scope="module")
def artifacts(model_dirs, tmp_path_factory):
    """static (SmoothQuant + MSE observer) and dynamic W8A8 artifacts of the tiny Llama."""
    runner, d = CliRunner(), tmp_path_factory.mktemp("w8a8")
    out = {}
    for label, extra in (("static", ["--smoothquant", "0.5", "--observer", "mse"]), ("dynamic", ["--dynamic"])):
        out[label] = d / label
        r = runner.invoke(cli, ["quantize", str(model_dirs["llama"]), "--bits", "8", "--activations", "int8",
                                *extra, *CALIB, "--out", str(out[label])])
        assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("label", ["static", "dynamic"])
def test_artifact_round_trip(artifacts, label, tokens):
    art = artifacts[label]
    lm = load_model(art)
    mods = {n: m for n, m in lm.model.named_modules() if isinstance(m, W8A8Linear)}
    assert len(mods) == 14 and all(m.activations == label for m in mods.values())
    assert all(m.weight.dtype == torch.int8 for m in mods.values())
    cfg = json.loads((art / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    (group,) = cfg["config_groups"].values()
    assert group["input_activations"]["dynamic"] is (label == "dynamic")
    assert group["input_activations"]["strategy"] == ("token" if label == "dynamic" else "tensor")
    prov = json.loads((art / "compress.json").read_text())
    assert [s["pass"] for s in prov["recipe"]] == (["smoothquant", "w8a8"] if label == "static" else ["w8a8"])
    # loading again gives the same numbers
    with torch.no_grad():
        a, b = lm.model(tokens).logits, load_model(art).model(tokens).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("label", ["static", "dynamic"])
def test_onnx_export_runs_integer_kernels_and_matches_torch(artifacts, label, tmp_path, tokens):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["export", str(artifacts[label]), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    if label == "static":
        assert ops.count("MatMulIntegerToFloat") == 14
        assert ops.count("QuantizeLinear") == 8  # one per shared input: q/k/v, o, gate/up, down per layer
    else:
        assert ops.count("MatMulInteger") == 14 and ops.count("Round") == 8
    assert ops.count("MatMul") == 1  # only the float head
    fmt = json.loads((out / "compress.json").read_text())["format_exported"]
    assert fmt["w8a8_matmuls"] == 14 and fmt["verify_max_abs_logit_diff"] < 1e-3
    assert 0 <= fmt["verify_w8a8_noise_floor"] and fmt["verify_tolerance"] >= 0.25
    ids = tokens[:, :40].numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    got = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = load_model(artifacts[label]).model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-3


def test_float_fallback_stages_survive_save_load_and_onnx(artifacts, model_dirs, tmp_path, tokens):
    """--fallback-error: the worst stage stays a float Linear in the artifact (listed in the compressed-tensors
    ignore list), and the ONNX export runs it as a float MatMul beside the integer ones."""
    prov = json.loads((artifacts["static"] / "compress.json").read_text())
    (rep,) = [r for r in prov["reports"] if r["name"] == "w8a8"]
    errors = sorted(rep["config"]["stage_errors"].values())
    art = tmp_path / "fallback"
    r = CliRunner().invoke(cli, ["quantize", str(model_dirs["llama"]), "--bits", "8", "--activations", "int8",
                                 "--smoothquant", "0.5", "--observer", "mse", "--fallback-error",
                                 repr((errors[-1] + errors[-2]) / 2), *CALIB, "--out", str(art)])
    assert r.exit_code == 0, r.output
    (rep,) = [r for r in json.loads((art / "compress.json").read_text())["reports"] if r["name"] == "w8a8"]
    floats = rep["config"]["float_fallback"]
    assert floats and rep["modules"] == 14 - len(floats)
    model = load_model(art).model
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in floats)
    cfg = json.loads((art / "config.json").read_text())["quantization_config"]
    assert set(floats) <= set(cfg["ignore"])
    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["export", str(art), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import onnx

    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 14 - len(floats) and ops.count("MatMul") == 1 + len(floats)
    assert json.loads((out / "compress.json").read_text())["format_exported"]["verify_max_abs_logit_diff"] < 1e-3


def test_w8a8_refused_where_it_cannot_go(artifacts, model_dirs, tmp_path, make_adapter):
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(artifacts["static"]), "--format", "gguf", "--out", str(tmp_path / "g")])
    assert r.exit_code == 1 and "GGUF has no int8-activation format" in r.output
    assert not (tmp_path / "g").exists()
    base = load_model(model_dirs["llama"]).model
    make_adapter(base, tmp_path / "adapter")
    r = runner.invoke(cli, ["merge-lora", str(artifacts["static"]), "--adapter", str(tmp_path / "adapter"),
                            "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "merging into W8A8 artifacts is not supported" in r.output


@pytest.mark.parametrize("args,message", [
    (["--bits", "4", "--activations", "int8"], "pass --bits 8"),
    (["--bits", "8", "--activations", "int8", "--group-size", "64"], "--group-size do not apply to W8A8"),
    (["--bits", "8", "--activations", "int8", "--dynamic", "--observer", "kl"], "need calibrated (static)"),
    (["--bits", "8", "--activations", "int8", "--smoothquant", "lots"], "alpha in [0, 1] or 'search'"),
    (["--bits", "8", "--activations", "int8", "--smoothquant", "1.5"], "[0, 1]"),
    (["--bits", "8", "--observer", "mse"], "add --activations int8"),
    (["--bits", "8", "--activations", "int8", "--dynamic", "--fallback-error", "0.1"], "need calibrated (static)"),
    (["--bits", "8", "--activations", "int8", "--fallback-error", "-1"], "must be positive"),
    (["--bits", "8", "--fallback-error", "0.1"], "add --activations int8"),
])
def test_cli_refuses_inconsistent_options(model_dirs, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["quantize", str(model_dirs["llama"]), *args, *CALIB, "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_noise_floor_measures_the_models_own_rounding_sensitivity(artifacts, monkeypatch):
    import export.onnx as onnx_export

    lm = load_model(artifacts["static"])
    monkeypatch.setattr(onnx_export, "W8A8_JITTER", 0.0)
    assert onnx_export.w8a8_noise_floor(lm) == 0.0  # unperturbed: the same logits, hooks removed after
    monkeypatch.setattr(onnx_export, "W8A8_JITTER", 0.05)  # codes move: so do the logits
    assert onnx_export.w8a8_noise_floor(lm) > 1e-3
    assert not any(m._forward_pre_hooks for m in lm.model.modules())


def test_export_check_still_catches_a_wrong_graph(artifacts, tmp_path, monkeypatch):
    """The noise-floor allowance does not hide a real export bug: one MatMul scaled wrong fails the check."""
    from onnx import numpy_helper

    import export.onnx_fused as fused

    real = fused.build_fused_graph

    def broken(model, **kw):
        proto, used = real(model, **kw)
        mm = next(n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat")
        init = next(i for i in proto.graph.initializer if i.name == mm.input[2])  # the activation scale
        proto.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(init) * 2, "broken_scale"))
        mm.input[2] = "broken_scale"  # one MatMul's output doubled, as a layout bug would do
        return proto, used

    monkeypatch.setattr(fused, "build_fused_graph", broken)
    out = tmp_path / "onnx"
    r = CliRunner().invoke(cli, ["export", str(artifacts["static"]), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 1 and "ONNX export check failed" in r.output and "the torch model itself" in r.output
    assert not out.exists()
