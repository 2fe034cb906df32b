import json
from pathlib import Path

import pytest
import torch

from calibrate.data import CalibConfig, load_calibration
from calibrate.stats import ChannelStats, HessianCollector
from compress.data import read_source_text as read_text
from compress.recipe import Recipe


def test_windows_are_seeded_slices_of_the_validation_split(tiny_tokenizer):
    text = read_text("wikitext2")
    a = load_calibration(tiny_tokenizer, CalibConfig(samples=5, seq_len=40, seed=1), text)
    b = load_calibration(tiny_tokenizer, CalibConfig(samples=5, seq_len=40, seed=1), text)
    c = load_calibration(tiny_tokenizer, CalibConfig(samples=5, seq_len=40, seed=2), text)
    assert a.shape == (5, 40) and torch.equal(a, b) and not torch.equal(a, c)
    assert tiny_tokenizer.decode(a[0]) in text


def test_jsonl_field_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert read_text(f"{tmp_path / 'd'}.jsonl:text") == "alpha\n\nbeta"
    with pytest.raises(ValueError, match="no field 'body'"):
        read_text(f"{tmp_path / 'd'}.jsonl:body")
    with pytest.raises(ValueError, match="not found"):
        read_text(str(tmp_path / "missing.txt"))


def test_too_short_text_refused(tiny_tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    with pytest.raises(ValueError, match="need more than seq_len"):
        load_calibration(tiny_tokenizer, CalibConfig(source=str(f), seq_len=64), read_text(str(f)))


def test_hessian_is_independent_of_batching():
    x = torch.randn(3, 50, 16)
    one, split = HessianCollector(16), HessianCollector(16)
    one.add_batch(x)
    for i in range(3):
        split.add_batch(x[i])
    torch.testing.assert_close(one.hessian, split.hessian)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(one.hessian, 2 * flat.T @ flat / 150)
    with pytest.raises(ValueError, match="no calibration tokens"):
        _ = HessianCollector(4).hessian


@pytest.mark.parametrize("n", [1000, 1536])
def test_hessian_from_lower_panels_equals_the_full_product(n):
    x = torch.randn(2, 40, n, dtype=torch.float64)
    h = HessianCollector(n)
    assert len(h._bounds) > 2  # wide enough to be computed in panels
    h.add_batch(x[0])
    h.add_batch(x[1])
    flat = x.reshape(-1, n)
    want = (2 * flat.T @ flat / 80).float()
    torch.testing.assert_close(h.hessian, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(h.hessian, h.hessian.T)


def test_channel_stats():
    s = ChannelStats(3)
    s.add_batch(torch.tensor([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]]))
    torch.testing.assert_close(s.mean_abs, torch.tensor([2.0, 2.0, 0.0]))
    torch.testing.assert_close(s.l2_norm, torch.tensor([10**0.5, 8**0.5, 0.0]))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_load(path):
    assert Recipe.from_file(path).steps
