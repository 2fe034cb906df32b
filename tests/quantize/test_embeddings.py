"""Embedding quantization (`quantize_embeddings`, `compress quantize --embeddings`): the token embedding as
packed groups, a head tied to it stored once and computing with the same quantized matrix, in every format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from compress.cli import cli
from compress.models import load_model
from compress.pipeline import apply
from compress.quantize.grid import fake_quantize
from compress.quantize.qembedding import QuantEmbedding, TiedHead
from compress.quantize.scheme import QuantScheme
from compress.recipe import Recipe


def _with_embedding(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """The float model whose embedding (and a head tied to it) holds the quantized numbers: what the artifact
    must compute, built here from the scheme's definition rather than by the code under test."""
    ref = copy.deepcopy(model)
    emb = ref.get_input_embeddings()
    with torch.no_grad():
        emb.weight.copy_(fake_quantize(emb.weight.float(), QuantScheme(bits=bits, group_size=32)))
    return ref


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits", [8, 4])
def test_cli_artifact_stores_the_tied_matrix_once_and_computes_with_it(model_dir, tmp_path, tokens, bits):
    run = CliRunner().invoke
    for name, extra in (("float", []), ("q", ["--embeddings", f"int{bits}"])):
        r = run(cli, ["quantize", str(model_dir), "--method", "rtn", "--group-size", "32", *extra,
                      "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    src = load_model(model_dir).model
    assert src.config.tie_word_embeddings
    art = load_model(tmp_path / "q").model
    emb, head = art.get_input_embeddings(), art.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, TiedHead) and head.embedding is emb
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("lm_head.") for k in keys)  # once: the embedding's packed words
    name = next(n for n, m in art.named_modules() if m is emb)
    assert {f"{name}.weight_packed", f"{name}.weight_scale"} <= keys and f"{name}.weight" not in keys
    # the artifact computes what the float model with the quantized embedding (tied) computes, RTN elsewhere
    float_art = load_model(tmp_path / "float").model
    ref = _with_embedding(float_art, bits)
    got, want = _logits(art, tokens), _logits(ref, tokens)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    saved = (tmp_path / "float" / "model.safetensors").stat().st_size - (tmp_path / "q" / "model.safetensors").stat().st_size
    vocab, hidden = emb.num_embeddings, emb.embedding_dim
    assert saved == pytest.approx(vocab * hidden * (4 - bits / 8 - 2 / 32), rel=0.02)
    from eval.results import parameter_count

    assert parameter_count(art) == parameter_count(src)  # the tied matrix counted once, as in the float model
    report = json.loads((tmp_path / "q" / "compress.json").read_text())["reports"][-1]
    assert report["name"] == "quantize_embeddings" and report["config"]["tied_head"] is not None
    assert report["metrics"]["bits_per_weight"] == pytest.approx(bits + 0.5)


@pytest.mark.parametrize("bits", [8, 4])
def test_onnx_and_gguf_exports_hold_the_quantized_embedding_once(model_dirs, tmp_path, bits):
    """ONNX: the embedding's MatMulNBits blocks are the only copy of the matrix (the gather and the tied head read
    them), logits match torch and greedy decoding with the KV cache picks torch's tokens. GGUF: token_embd holds
    the same numbers as Q8_0 / Q4_0 and no output tensor (llama.cpp reuses token_embd); llama.cpp agrees."""
    pytest.importorskip("onnxruntime")
    import onnx
    from test_arch_matrix import greedy_with_cache

    run = CliRunner().invoke
    r = run(cli, ["quantize", str(model_dirs["llama"]), "--method", "rtn", "--group-size", "32",
                  "--embeddings", f"int{bits}", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    r = run(cli, ["export", str(tmp_path / "q"), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "onnx" / "compress.json").read_text())["format_exported"]
    assert check["verify_max_abs_logit_diff"] < 1e-3
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    lm = load_model(tmp_path / "q")
    emb = lm.model.get_input_embeddings()
    vocab_sized = [i.name for i in graph.initializer if emb.num_embeddings in i.dims]
    assert vocab_sized == ["model.embed_tokens.qweight", "model.embed_tokens.scales"], vocab_sized  # once, packed
    want = [5, 77, 301, 9]
    with torch.inference_mode():
        for _ in range(6):
            want.append(int(lm.model(input_ids=torch.tensor([want])).logits[0, -1].argmax()))
    assert greedy_with_cache(tmp_path / "onnx", want[:4], 6) == want

    pytest.importorskip("gguf")
    import gguf

    r = run(cli, ["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "gguf")])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == ("Q8_0" if bits == 8 else "Q4_0") and "output.weight" not in types
    check = json.loads((tmp_path / "gguf" / "compress.json").read_text())["format_exported"]
    assert check["gguf_reader_max_abs_weight_diff"] == 0.0
    if "llama_cpp_max_kl" in check:
        assert check["llama_cpp_max_kl"] <= 0.01


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral", "qwen3_moe"])
def test_scaled_and_untied_embeddings(arch, tiny_tokenizer, tmp_path):
    """Gemma's lookup times sqrt(hidden) survives (also through save and load); an untied head stays float."""
    from test_arch_matrix import make_arch_model

    from compress.models import LoadedModel, save_model

    model = make_arch_model(arch, len(tiny_tokenizer) + 8).eval()
    ids = torch.randint(3, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(_with_embedding(model, 4), ids)
    tied = model.config.tie_word_embeddings
    [rep] = apply(model, Recipe.single("quantize_embeddings", bits=4), None)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedHead) == tied and rep.config["tied_head"] == (
        "lm_head" if tied else None)
    assert (_logits(model, ids) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    save_model(LoadedModel(model, tiny_tokenizer, "src", []), tmp_path / "a")
    back = load_model(tmp_path / "a").model
    assert (_logits(back, ids) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    pytest.importorskip("onnxruntime")
    from export.onnx import export_onnx

    out = export_onnx(load_model(tmp_path / "a"), tmp_path / "onnx")  # (checks its logits against torch's)
    check = json.loads((out / "compress.json").read_text())["format_exported"]
    assert check["verify_max_abs_logit_diff"] < 1e-3


def test_bad_requests_are_refused_in_one_line(model_dirs, tmp_path, tiny_tokenizer):
    from test_arch_matrix import make_arch_model

    run = CliRunner().invoke
    r = run(cli, ["quantize", str(model_dirs["llama"]), "--method", "rtn", "--group-size", "32",
                  "--embeddings", "int2", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "int2" in r.output
    model = make_arch_model("bert", len(tiny_tokenizer) + 8)
    with pytest.raises(ValueError, match="decoder language models"):
        apply(model, Recipe.single("quantize_embeddings"), None)
    model = make_arch_model("llama", len(tiny_tokenizer) + 8)
    apply(model, Recipe.single("quantize_embeddings"), None)
    with pytest.raises(ValueError, match="already quantized"):
        apply(model, Recipe.single("quantize_embeddings"), None)
    with pytest.raises(ValueError, match="group size 7 does not divide"):
        Recipe.single("quantize_embeddings", group_size=7).steps[0].config.check_model(
            make_arch_model("llama", len(tiny_tokenizer) + 8))


def test_a_large_vocabulary_is_stored_once_in_every_format(tmp_path, tiny_tokenizer):
    """A tied model whose 65,536 x 64 embedding is most of it (as Gemma 3 270M's 262 k x 640): after
    --embeddings int8 each format holds that matrix once, at about 8.5 bits a weight."""
    pytest.importorskip("onnxruntime")
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab, hidden = 65536, 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    run = CliRunner().invoke
    for args in (["quantize", str(tmp_path / "src"), "--method", "rtn", "--group-size", "32", "--embeddings", "int8",
                  "--out", str(tmp_path / "q")],
                 ["export", str(tmp_path / "q"), "--format", "onnx", "--out", str(tmp_path / "onnx")],
                 ["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "gguf")]):
        r = run(cli, args)
        assert r.exit_code == 0, r.output
    once = vocab * hidden * (1 + 2 / 32)  # int8 codes and a float16 scale per 32
    rest = 1.5e6  # every other tensor of the 1-layer model, and the formats' headers, in any of them
    for f in (tmp_path / "q" / "model.safetensors", tmp_path / "onnx" / "model.onnx", tmp_path / "gguf" / "model.gguf"):
        assert once < f.stat().st_size < once + rest, (f, f.stat().st_size, once)
