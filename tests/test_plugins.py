"""A pass from a separately installed distribution appears in `compress passes` and runs in a recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PKG = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(PKG)], check=True, cwd=build,
                   env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    assert (site / "compress_demo_plugin").is_dir()
    return site


def _compress(args, site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, env=env)


def test_plugin_pass_listed(plugin_site):
    r = _compress(["passes"], plugin_site)
    assert r.returncode == 0, r.stderr
    assert "scale_weights: Scale weights" in r.stdout
    assert "factor = 2.0" in r.stdout
    assert "demo_plugin" in r.stdout.splitlines()[-1]


def test_plugin_pass_not_there_without_the_distribution():
    r = subprocess.run([sys.executable, "-m", "compress", "passes"], capture_output=True, text=True)
    assert r.returncode == 0 and "scale_weights" not in r.stdout


def test_plugin_pass_runs_in_recipe(plugin_site, model_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- pass: scale_weights\n  factor: 3.0\n  targets: ['re:.*layers\\.0\\..*']\n"
                      "- pass: rtn\n  bits: 8\n")
    r = _compress(["run", str(recipe), str(model_dirs["llama"]), "--out", str(tmp_path / "o")], plugin_site)
    assert r.returncode == 0, r.stderr
    prov = json.loads((tmp_path / "o" / "compress.json").read_text())
    assert [s["pass"] for s in prov["recipe"]] == ["scale_weights", "rtn"]
    assert prov["reports"][0]["modules"] == 7  # q, k, v, o, gate, up, down of layer 0
    # layer 0 was scaled before quantization: its int8 scales are 3x those of a plain rtn run
    plain = tmp_path / "plain.yaml"
    plain.write_text("- pass: rtn\n  bits: 8\n")
    r = _compress(["run", str(plain), str(model_dirs["llama"]), "--out", str(tmp_path / "p")], plugin_site)
    assert r.returncode == 0, r.stderr
    a, b = load_file(tmp_path / "o" / "model.safetensors"), load_file(tmp_path / "p" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    torch.testing.assert_close(a[key].float(), 3 * b[key].float(), rtol=2e-3, atol=0)
    key1 = "model.layers.1.self_attn.q_proj.weight_scale"
    assert torch.equal(a[key1], b[key1])
