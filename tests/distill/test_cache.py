"""Teacher cache: top-k forward KL matches the full KL at k = vocab, the cache is filled once and then
replaces the teacher (which is not even loaded), and a cache made for other settings is refused."""

from __future__ import annotations

import pytest
import torch

from compress.distill.kd import DistillConfig
from compress.distill.losses import logit_divergence, topk_forward_kl
from compress.distill.train import train
from compress.recipe import Recipe
from compress.runner import compress_model

FAST = {"seq_len": 32, "batch_size": 4, "micro_batch_size": 2, "mixed_precision": "no", "heldout": 4,
        "steps": 6, "lr": 3e-3, "warmup_steps": 1}


def test_topk_kl_is_the_full_kl_at_full_k_and_a_lower_bound_below():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 50), 2 * torch.randn(2, 5, 50)
    for temp in (1.0, 2.0):
        full = logit_divergence(s, t, temperature=temp)
        lp = torch.log_softmax(t / temp, -1)
        for k, check in ((50, "equal"), (8, "below"), (1, "below")):
            v, i = lp.topk(k, -1)
            got = topk_forward_kl(s, v, i, temperature=temp)
            if check == "equal":
                assert float(got) == pytest.approx(float(full), rel=1e-5)
            else:
                assert 0 <= float(got) <= float(full) + 1e-6
    v, i = torch.log_softmax(t, -1).topk(8, -1)
    assert float(topk_forward_kl(t, v, i)) == pytest.approx(0.0, abs=1e-6)  # the teacher against itself


def test_cache_fills_once_then_trains_without_the_teacher(tiny_tokenizer, make_tiny, tmp_path):
    vocab = len(tiny_tokenizer)
    teacher = make_tiny("llama", 0)
    calls = []

    def load():
        calls.append(1)
        return teacher

    ident = ("tiny-teacher", "0" * 64)
    cfg = DistillConfig(teacher_cache=str(tmp_path / "cache"), cache_topk=vocab, **FAST)
    a = make_tiny("llama", 1)
    out_a = train(a, load, tiny_tokenizer, cfg, teacher_id=ident)
    assert calls == [1] and len(list((tmp_path / "cache").glob("train-*.safetensors"))) > 0
    b = make_tiny("llama", 1)
    out_b = train(b, load, tiny_tokenizer, cfg, teacher_id=ident)  # everything it reads is cached
    assert calls == [1]
    assert [r["loss"] for r in out_a["record"]["curve"]] == [r["loss"] for r in out_b["record"]["curve"]]
    # with k = the whole vocabulary the cached loss is the teacher's own: the same curve as without a cache
    c = make_tiny("llama", 1)
    out_c = train(c, teacher, tiny_tokenizer, DistillConfig(**FAST))
    for ra, rc in zip(out_a["record"]["curve"], out_c["record"]["curve"], strict=True):
        assert ra["loss"] == pytest.approx(rc["loss"], rel=1e-4, abs=1e-6)
    assert "heldout_kl_to_teacher_topk_after" in out_a["metrics"]

    with pytest.raises(ValueError, match="other settings.*topk"):
        train(make_tiny("llama", 1), load, tiny_tokenizer, DistillConfig(teacher_cache=str(tmp_path / "cache"),
              cache_topk=4, **FAST), teacher_id=ident)
    with pytest.raises(ValueError, match="forward-KL logit distillation only"):
        DistillConfig(teacher_cache="c", hidden_weight=1.0)


def test_recipe_with_a_cache_does_not_load_the_teacher_the_second_time(model_dirs, make_tiny, tiny_tokenizer,
                                                                       tmp_path, monkeypatch):
    from compress import models

    teacher, student = model_dirs["llama"], tmp_path / "student"
    make_tiny("llama", 1).save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    step = {"pass": "distill", "teacher": str(teacher), "teacher_cache": str(tmp_path / "cache"), "cache_topk": 16,
            **FAST}
    full_loads = []
    real = models.load_model

    def spy(path=None, **kw):
        if not kw.get("lazy"):
            full_loads.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    compress_model(student, Recipe.from_steps([step]), tmp_path / "a")
    assert full_loads == [str(teacher)]  # the first run fills the cache with the teacher
    compress_model(student, Recipe.from_steps([step]), tmp_path / "b")
    assert full_loads == [str(teacher)]  # the second reads the cache only
