"""Our W8A8 artifacts load in transformers through the compressed-tensors package, unchanged (weight-only
artifacts of every architecture and width: tests/test_arch_matrix.py)."""

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("compressed_tensors")

from compress.cli import cli  # noqa: E402
from compress.models import load_model  # noqa: E402


def test_transformers_runs_our_static_w8a8_artifact_with_the_same_logits(model_dirs, tmp_path):
    """compressed-tensors reads the int8 weights, weight scales and the calibrated activation grid
    (input_scale, input_zero_point) and simulates the same W8A8 product."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w8a8"
    r = CliRunner().invoke(cli, ["quantize", str(model_dirs["llama"]), "--bits", "8", "--activations", "int8",
                                 "--smoothquant", "0.5", "--calib-samples", "4", "--calib-seq-len", "64",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    ours = load_model(out).model
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    scheme = theirs.model.layers[0].self_attn.q_proj.quantization_scheme
    assert scheme.input_activations.strategy == "tensor" and not scheme.input_activations.dynamic
    ids = torch.tensor([list(range(10, 60))])
    with torch.inference_mode():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-3
