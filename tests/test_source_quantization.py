"""A source whose weights were already quantized (a GGUF of quantized blocks) is said to be so before a quantizing
recipe rounds them again: on the console, in the summary and in the artifact's provenance, with the types."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
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
