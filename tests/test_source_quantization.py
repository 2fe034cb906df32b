"""A source whose weights were already quantized (a GGUF of quantized blocks) is said to be so before a quantizing
recipe rounds them again: on the console, in the summary and in the artifact's provenance, with the types."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.cli import cli
from compress.files import gguf_tensor_types
from compress.models import load_model, quantized_gguf

gguf = pytest.importorskip("gguf")


def test_tensor_types_are_read_from_the_header(tmp_path):
    """K-quant blocks (raw bytes: only the header is read) and float tensors, counted by type."""
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((2, 144), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("blk.0.attn_v.weight", np.zeros((2, 210), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    for f in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        f()
    w.close()
    types = gguf_tensor_types(tmp_path / "k.gguf")
    assert types == {"Q4_K": 1, "Q6_K": 1, "F32": 1}
    assert quantized_gguf("k.gguf", types) == {"format": "gguf", "file": "k.gguf", "tensor_types": types}
    assert quantized_gguf("f.gguf", {"F32": 3, "F16": 2}) is None


def test_quantizing_a_quantized_gguf_says_so(model_dirs, tmp_path, caplog):
    run = CliRunner().invoke
    for args in (["quantize", str(model_dirs["llama"]), "--method", "rtn", "--group-size", "32",
                  "--out", str(tmp_path / "q")],
                 ["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "g")]):
        r = run(cli, args)
        assert r.exit_code == 0, r.output
    src = tmp_path / "g" / "model.gguf"
    lm = load_model(src)
    assert lm.source_quantization["tensor_types"]["Q4_0"] >= 14
    with caplog.at_level(logging.WARNING):
        r = run(cli, ["quantize", str(src), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "qq")])
    assert r.exit_code == 0, r.output
    warned = [rec.getMessage() for rec in caplog.records if "already quantized" in rec.getMessage()]
    assert len(warned) == 1 and "GGUF model.gguf: Q4_0 x" in warned[0], warned
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["source_quantization"]["tensor_types"]["Q4_0"] >= 14
    prov = json.loads((tmp_path / "qq" / "compress.json").read_text())
    assert prov["source"]["quantized"] == summary["source_quantization"]
    # carried on: an artifact of that artifact still names the quantized origin
    assert load_model(tmp_path / "qq").source_quantization == summary["source_quantization"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a float source: no word of it
        r = run(cli, ["quantize", str(model_dirs["llama"]), "--method", "rtn", "--group-size", "32",
                      "--out", str(tmp_path / "plain")])
    assert r.exit_code == 0 and not any("already quantized" in rec.getMessage() for rec in caplog.records)
    assert json.loads(r.stdout[r.stdout.index("{"):])["source_quantization"] is None


def test_a_q4_k_gguf_loads_and_is_named_as_quantized(tmp_path, tiny_tokenizer):
    """A llama GGUF whose projections are Q4_K blocks (K-quant super-blocks of 256: random codes, small scales),
    written with our GGUF writer: transformers dequantizes it, and the source is named as Q4_K."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.models import LoadedModel
    from export import gguf as gexp
    from export.gguf_encode import Encoded
    from export.gguf_tokenizer import tokenizer_fields

    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    lm = LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), tiny_tokenizer, "tiny", [])
    arch, permute = gexp._check_model(lm)
    tensors = gexp._tensors(lm, arch, permute, "f32", False)
    rng = np.random.default_rng(0)
    q4k = gguf.GGMLQuantizationType.Q4_K
    for name, enc in list(tensors.items()):
        if name.startswith("blk.") and enc.expect.ndim == 2 and enc.expect.shape[1] % 256 == 0:
            rows, blocks = enc.expect.shape[0], enc.expect.shape[1] // 256
            raw = rng.integers(0, 256, (rows, blocks, 144), dtype=np.uint8)
            raw[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # super-block scale d
            raw[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # and min scale dmin
            raw = raw.reshape(rows, blocks * 144)
            tensors[name] = Encoded("Q4_K", raw, gguf.quants.dequantize(raw, q4k), None)
    path = tmp_path / "k.gguf"
    gexp.write_gguf(lm, path, tensors, arch, tokenizer_fields(lm, len(tiny_tokenizer), tmp_path),
                    {"source": {"path": "tiny"}})
    types = gguf_tensor_types(path)
    assert types["Q4_K"] == 7  # q, k, v, o, gate, up, down
    loaded = load_model(path)
    assert loaded.source_quantization["tensor_types"] == types
    w = loaded.model.model.layers[0].self_attn.q_proj.weight
    assert torch.isfinite(w).all() and float(w.abs().max()) > 0  # dequantized Q4_K values, not zeros
