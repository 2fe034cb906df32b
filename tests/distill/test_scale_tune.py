"""Scale tuning: packed modules' scales refitted to a float reference; codes, zero points and format kept."""

import copy

import pytest
import torch

from compress.distill.scale_tune import ScaleTuneConfig, TunedScales, tune_scales
from compress.pipeline import apply
from compress.quantize.qlinear import QuantLinear
from compress.recipe import Recipe


def _quantized(make_tiny, symmetric: bool):
    """A tiny llama and its RTN W3 g16 copy (coarse, so the scales have something to fix)."""
    ref = make_tiny("llama")
    q = copy.deepcopy(ref)
    apply(q, Recipe.single("rtn", bits=3, group_size=16, symmetric=symmetric))
    names = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    return ref, q, names


def _calib(n=64, seq=32):
    return torch.randint(3, 200, (n, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_tuning_lowers_the_kl_and_keeps_codes_and_zero_points(make_tiny, symmetric):
    ref, q, refs = _quantized(make_tiny, symmetric)
    before = {n: (q.get_submodule(n).codes().clone(), q.get_submodule(n).zero_point().clone(),
                  q.get_submodule(n).weight_scale.clone()) for n in refs}
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(7))  # not in the calibration set
    with torch.no_grad():
        f = torch.log_softmax(ref(ids).logits, -1)

    def kl():
        with torch.no_grad():
            s = torch.log_softmax(q(ids).logits, -1)
        return float((f.exp() * (f - s)).sum(-1).mean())

    kl0 = kl()
    trainable = [n for n, p in q.named_parameters() if p.requires_grad]
    assert trainable  # (the embedding and norms)
    out = tune_scales(q, ref, refs, _calib(), ScaleTuneConfig(steps=30, batch_size=4, lr=1e-2, forward_dtype="float32"))
    print(out, kl0, kl())
    # a random tiny model gains little from its scales alone (measured -10 % held out); the reference model's
    # merged LoRA halves it (bench/lora_merge_reference.py)
    assert out["kept"] == 1.0 and out["kl_after"] < 0.95 * out["kl_before"]
    assert kl() < 0.97 * kl0  # also on windows it never saw
    changed = 0
    for n, (codes, zero, scale) in before.items():
        m = q.get_submodule(n)
        assert isinstance(m, QuantLinear)  # the packed module is back in place
        assert torch.equal(m.codes(), codes) and torch.equal(m.zero_point(), zero)
        assert m.weight_scale.dtype == scale.dtype and m.weight_scale.shape == scale.shape
        changed += not torch.equal(m.weight_scale, scale)
    assert changed == len(before)
    assert [n for n, p in q.named_parameters() if p.requires_grad] == trainable  # frozen only while tuning


def test_a_result_that_is_no_better_is_not_kept(make_tiny):
    """A learning rate that wrecks the scales: the held-out KL rises, so the original scales stay."""
    ref, q, refs = _quantized(make_tiny, True)
    scales = {n: q.get_submodule(n).weight_scale.clone() for n in refs}
    out = tune_scales(q, ref, refs, _calib(), ScaleTuneConfig(steps=4, batch_size=4, lr=5.0, forward_dtype="float32"))
    assert out["kept"] == 0.0 and out["kl_tuned"] > out["kl_before"] == out["kl_after"]
    assert all(torch.equal(q.get_submodule(n).weight_scale, s) for n, s in scales.items())


def test_tuned_forward_is_the_packed_forward_at_the_start(make_tiny):
    _, q, refs = _quantized(make_tiny, False)
    m = q.get_submodule(refs[0])
    x = torch.randn(3, m.in_features)
    torch.testing.assert_close(TunedScales(m)(x), m(x), rtol=1e-5, atol=1e-6)


def test_bad_input(make_tiny):
    ref, q, refs = _quantized(make_tiny, True)
    with pytest.raises(ValueError, match="at least 2 calibration windows"):
        tune_scales(q, ref, refs, _calib(n=1), ScaleTuneConfig())
    with pytest.raises(ValueError, match="lm_head is not a packed"):
        tune_scales(q, ref, ["lm_head"], _calib(), ScaleTuneConfig())
    with pytest.raises(ValueError, match="lr must be positive"):
        ScaleTuneConfig(lr=0)
    with pytest.raises(ValueError, match="heldout"):
        ScaleTuneConfig(heldout=1.0)


def _wiki_windows(tokenizer, n: int, seq: int, split: str = "validation") -> torch.Tensor:
    from compress.data import wikitext2_path

    return torch.tensor(tokenizer(wikitext2_path(split).read_text()[:60_000]).input_ids[: n * seq]).view(n, seq)


@pytest.mark.parametrize("recipe", [
    [{"pass": "gptq", "bits": 3, "group_size": 16}],
    [{"pass": "awq", "bits": 3, "group_size": 16}],
    [{"pass": "awq", "bits": 3, "group_size": 16, "quantize": False}, {"pass": "gptq", "bits": 3, "group_size": 16}],
    [{"pass": "mixed", "target_bits": 3.9, "group_size": 16, "candidates": [2, 3]}],
], ids=["gptq", "awq", "awq+gptq", "mixed"])
def test_a_scale_tune_step_after_a_quantizer(make_tiny, tiny_tokenizer, model_dirs, recipe):
    """scale_tune after a calibrated quantizer, toward the model the recipe started from: the same codes as
    without it, other scales, and a model closer to the float one on windows it never saw (after AWQ too, whose
    folded scales make the packed model's own float weights differ from the reference's)."""
    calib, test = _wiki_windows(tiny_tokenizer, 64, 32), _wiki_windows(tiny_tokenizer, 4, 32, "test")
    ref = make_tiny("llama")  # the model saved in model_dirs["llama"]
    with torch.no_grad():
        f = torch.log_softmax(ref(test).logits, -1)
    models, reports = {}, {}
    tune = {"pass": "scale_tune", "steps": 24, "lr": 3e-3, "reference": str(model_dirs["llama"])}
    for steps in (0, 24):
        m = copy.deepcopy(ref)
        reports[steps] = apply(m, Recipe.from_steps([*recipe, tune] if steps else recipe), calib)[-1]
        models[steps] = m

    def kl(m):
        with torch.no_grad():
            return float((f.exp() * (f - torch.log_softmax(m(test).logits, -1))).sum(-1).mean())

    rep = reports[24]
    assert rep.name == "scale_tune" and rep.config["steps"] == 24 and rep.modules == 14
    assert rep.metrics["kept"] == 1.0 and rep.metrics["kl_after"] < rep.metrics["kl_before"]
    assert kl(models[24]) < kl(models[0])
    packed = {n: q for n, q in models[0].named_modules() if isinstance(q, QuantLinear)}
    assert len(packed) == 14
    for n, q in packed.items():
        t = models[24].get_submodule(n)
        assert torch.equal(t.codes(), q.codes()) and torch.equal(t.zero_point(), q.zero_point())
    assert any(not torch.equal(models[24].get_submodule(n).weight_scale, q.weight_scale) for n, q in packed.items())


def test_scale_tune_config_presets_and_nothing_to_tune(make_tiny, model_dirs):
    from compress.cli.quantize import _recipe

    with pytest.raises(ValueError, match="steps must be positive"):
        ScaleTuneConfig(steps=0)
    for name in ("gptq", "awq", "mixed"):  # the quantizers stream blocks again: tuning is a step of its own
        extra = {"target_bits": 4.0} if name == "mixed" else {}
        [step] = Recipe.single(name, **extra).steps
        assert step.spec.streams(step.config)
    [tune] = Recipe.single("scale_tune").steps
    assert not tune.spec.streams(tune.config)  # the tuning runs the whole model
    steps = _recipe({}, tune_steps=16).steps
    assert [s.name for s in steps] == ["awq", "gptq", "scale_tune"] and steps[-1].config.steps == 16
    steps = _recipe({"bits": 4}, "rtn", tune_steps=16).steps
    assert [s.name for s in steps] == ["rtn", "scale_tune"]  # any quantizer may be followed by the tuning
    # a float model has nothing to tune: no calibration asked for, no reference loaded, nothing changed
    m = make_tiny("llama")
    assert not tune.spec.calibrates(tune.config, m)
    (rep,) = apply(m, Recipe.single("scale_tune", reference=str(model_dirs["llama"]) + "-missing"))
    assert rep.modules == 0


def test_chunked_checkpointed_loss_trains_like_the_whole_window(make_tiny):
    """The memory-saving loss (blocks checkpointed, logits in chunks of positions) is the same loss with the
    same gradients: the tuned scales agree with the unchunked run's to float rounding."""
    ref, q, names = _quantized(make_tiny, True)
    runs = {}
    for chunk in (0, 10):
        m = copy.deepcopy(q)
        out = tune_scales(m, ref, names, _calib(), ScaleTuneConfig(steps=6, batch_size=4, lr=1e-2, loss_chunk=chunk,
                                                                   forward_dtype="float32"))
        runs[chunk] = (out, {n: m.get_submodule(n).weight_scale.float() for n in names})
    (a, sa), (b, sb) = runs[0], runs[10]
    assert a["kl_before"] == pytest.approx(b["kl_before"], rel=1e-5)
    assert a["kl_tuned"] == pytest.approx(b["kl_tuned"], rel=1e-3)
    assert all(torch.allclose(sa[n], sb[n], rtol=2e-3) for n in names)
    assert any(not torch.equal(sa[n], q.get_submodule(n).weight_scale.float()) for n in names)


def test_bad_loss_chunk_is_refused():
    with pytest.raises(ValueError, match="loss_chunk"):
        ScaleTuneConfig(loss_chunk=-1)


def test_a_recipe_quantizing_then_tuning_gets_calibration_data(model_dirs, tmp_path):
    """scale_tune needs data only on a model with packed modules: after rtn in the same recipe it will have them,
    so the runner draws the calibration windows although the model it loads has none yet."""
    from calibrate.data import CalibConfig
    from compress.runner import compress_model

    s = compress_model(model_dirs["llama"], Recipe.from_steps([{"pass": "rtn", "bits": 3, "group_size": 16},
                                                               {"pass": "scale_tune", "steps": 2}]),
                       tmp_path / "a", calib=CalibConfig(samples=8, seq_len=32))
    assert s["calibration"]["samples"] == 8 and s["reports"][1]["modules"] == 14
