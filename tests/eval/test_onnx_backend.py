import pytest
import torch

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_dir(model_dirs, tmp_path_factory):
    from compress.models import load_model
    from export.onnx import export_onnx

    return export_onnx(load_model(model_dirs["llama"]), tmp_path_factory.mktemp("onnx") / "llama")


def test_onnx_backend_matches_torch(onnx_dir, model_dirs, tiny_tokenizer):
    from compress.models import load_model
    from eval.backends import TorchBackend
    from eval.onnx_backend import OrtBackend
    from eval.perplexity import PerplexityConfig, wikitext2

    ort_b = OrtBackend(onnx_dir)
    torch_b = TorchBackend(load_model(model_dirs["llama"]).model, tiny_tokenizer)
    ids = torch.tensor([torch_b.encode("The tower is 324 metres tall, about the same height as an 81-storey building")])
    assert torch.allclose(ort_b.token_nll(ids), torch_b.token_nll(ids), rtol=1e-4, atol=1e-4)
    cfg = PerplexityConfig(windows=2, seq_len=64)
    a, b = wikitext2(ort_b, cfg), wikitext2(torch_b, cfg)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    assert a["backend"] == "onnxruntime" and a["protocol"] == b["protocol"]
    ident = ort_b.identity()
    assert ident["format"] == "onnx" and ident["parameters"] > 0 and ident["bytes_on_disk"] > 0


def test_eval_cli_picks_the_onnx_backend(onnx_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from compress.cli import cli

    out = tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["eval", str(onnx_dir), "--windows", "2", "--seq-len", "64", "--output", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["results"]["wikitext2"]["backend"] == "onnxruntime" and doc["model"]["format"] == "onnx"
