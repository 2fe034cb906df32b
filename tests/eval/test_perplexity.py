import math

import pytest
import torch
import torch.nn.functional as F

from eval.backends import TorchBackend
from eval.perplexity import PerplexityConfig, compute_perplexity, wikitext2


class UniformBackend:
    """Every token has probability 1/V: perplexity must be exactly V."""

    name = "uniform"
    bos_token_id = None

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text):
        return [ord(c) % self.vocab for c in text]

    def decode(self, ids):
        return "".join("a" if k % 5 else " " for k, _ in enumerate(ids))  # a word every 5 characters

    def token_nll(self, ids, *, bos=None):
        return torch.full((ids.shape[0], ids.shape[1] - 1), math.log(self.vocab), dtype=torch.float64)


def test_uniform_model_has_perplexity_vocab_size():
    r = compute_perplexity(UniformBackend(50), "x" * 1000, PerplexityConfig(windows=-1, seq_len=100), dataset="t")
    assert r["perplexity"] == pytest.approx(50.0)
    assert r["windows"] == 10 and r["tokens_scored"] == 10 * 99
    # per-window records sum to the total; the interval of a constant model is a point
    assert len(r["items"]) == 10 and sum(it["nll"] for it in r["items"]) == pytest.approx(990 * math.log(50))
    assert r["ci95"] == pytest.approx([50.0, 50.0])
    # word and byte perplexity: the same summed NLL over the words / bytes the scored tokens spell
    assert r["bytes_scored"] == 990 and r["byte_perplexity"] == pytest.approx(50.0)
    assert r["bits_per_byte"] == pytest.approx(math.log2(50))
    assert r["word_perplexity"] == pytest.approx(math.exp(990 * math.log(50) / r["words_scored"]))


def test_matches_direct_computation(make_tiny, tiny_tokenizer):
    model = make_tiny("llama")
    backend = TorchBackend(model, tiny_tokenizer)
    cfg = PerplexityConfig(windows=3, seq_len=64, batch_size=2)
    r = wikitext2(backend, cfg)
    ids = torch.tensor(backend.encode(open(__import__("compress.data", fromlist=["x"]).wikitext2_path("test")).read()))
    total = 0.0
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 64 : (w + 1) * 64][None]
            logits = model(x).logits[0, :-1]
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    assert r["perplexity"] == pytest.approx(math.exp(total / (3 * 63)), rel=1e-6)
    assert r["protocol"]["seq_len"] == 64 and r["protocol"]["prepend_bos"] is False


def test_prepend_bos_is_recorded_and_changes_the_score(make_tiny, tiny_tokenizer):
    backend = TorchBackend(make_tiny("opt"), tiny_tokenizer)
    a = wikitext2(backend, PerplexityConfig(windows=2, seq_len=32))
    b = wikitext2(backend, PerplexityConfig(windows=2, seq_len=32, prepend_bos=True))
    assert b["protocol"]["prepend_bos"] is True
    assert a["tokens_scored"] == b["tokens_scored"]
    assert a["perplexity"] != b["perplexity"]


def test_too_short_text_and_bad_config():
    with pytest.raises(ValueError, match="less than one window"):
        compute_perplexity(UniformBackend(10), "abc", PerplexityConfig(seq_len=8), dataset="t")
    with pytest.raises(ValueError, match="windows must be"):
        PerplexityConfig(windows=0)
