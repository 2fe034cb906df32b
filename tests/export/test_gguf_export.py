"""GGUF export: our codes and scales as llama.cpp blocks, read back exactly; transformers loads the file."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from compress.cli import cli  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.quantize.qlinear import QuantLinear  # noqa: E402
from compress.quantize.scheme import QuantScheme  # noqa: E402
from export.gguf import GGUF_FILE, encode_quant, rope_row_order  # noqa: E402


def _module(bits, group, sym, *, K=128, N=8, seed=0):
    torch.manual_seed(seed)
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype="float16")
    ng = scheme.n_groups(K)
    q = torch.randint(0, 2**bits, (N, K))
    zero = torch.full((N, ng), float(2 ** (bits - 1))) if sym else torch.randint(0, 2**bits, (N, ng)).float()
    scale = torch.rand(N, ng) * 0.05 + 0.01
    return QuantLinear.from_codes(q, scale, zero, scheme)


@pytest.mark.parametrize("bits,group,sym,kind", [(8, 32, True, "Q8_0"), (8, -1, True, "Q8_0"), (4, 32, True, "Q4_0"),
                                                 (4, 128, True, "Q4_0"), (3, 64, True, "Q4_0"),
                                                 (2, 32, True, "Q4_0"), (4, 32, False, "Q4_1"),
                                                 (3, 32, False, "Q4_1")])
def test_blocks_decode_to_our_weights(bits, group, sym, kind):
    """gguf's own dequantizer turns our blocks into exactly the weights QuantLinear multiplies by."""
    from gguf.quants import dequantize

    m = _module(bits, group, sym)
    if not sym:  # Q4_1 needs fp16 offsets -zero * scale: use power-of-two scales, whose products are exact
        m.weight_scale.copy_((2.0 ** -torch.randint(4, 9, m.weight_scale.shape)).half())
    enc = encode_quant(m, "layer")
    assert enc.kind == kind
    got = dequantize(enc.data, gguf.GGMLQuantizationType[kind]).reshape(m.out_features, m.in_features)
    want = m.dequantize_weight().numpy()
    assert np.array_equal(got, want)
    assert enc.data.shape[1] == m.in_features // 32 * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]


@pytest.mark.parametrize("bits,group,sym,match", [(4, 16, True, "groups of 16"), (8, 32, False, "asymmetric 8-bit"),
                                                  (4, 32, False, "offset")])
def test_inexact_layouts_are_refused_or_requantized(bits, group, sym, match):
    m = _module(bits, group, sym, seed=1)
    with pytest.raises(ValueError, match=match):
        encode_quant(m, "model.layers.0.mlp.up_proj")
    enc = encode_quant(m, "x", requantize=True)
    assert enc.kind == ("Q8_0" if bits == 8 else "Q4_0")
    w = m.dequantize_weight().numpy()
    assert 0 < enc.requant_error == pytest.approx(float(np.abs(enc.expect - w).max()))
    # ggml's Q4_0 puts each block's extreme on -8, the other side reaching 7 steps: off by at most a step,
    # |max| / 8; Q8_0's step is |max| / 127, off by at most half of it
    assert enc.requant_error <= float(np.abs(w).max()) / (8 if bits < 8 else 254) + 1e-6


def test_rope_row_order_interleaves_the_halves_of_each_head():
    order = rope_row_order(2, 8)  # 2 heads of 4 rows: halves [0,1] [2,3] -> 0,2,1,3
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _quantize(model_dir, out, *args):
    r = CliRunner().invoke(cli, ["quantize", str(model_dir), "--method", "rtn", *args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("args,types", [(["--bits", "4", "--group-size", "32"], {"Q4_0"}),
                                        (["--bits", "8", "--group-size", "-1"], {"Q8_0"}),
                                        (["--bits", "4", "--group-size", "64", "--asym",
                                          "--scale-dtype", "float16"], None)])
def test_transformers_loads_our_gguf_with_the_artifacts_logits(model_dirs, tmp_path, args, types):
    """transformers dequantizes the file (un-permuting q/k) into the model our artifact is, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = _quantize(model_dirs["llama"], tmp_path / "art", *args)
    out = tmp_path / "gguf"
    r = CliRunner().invoke(cli, ["export", str(art), "--format", "gguf", "--out", str(out), "--requantize"])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "compress.json").read_text())["format_exported"]
    assert prov["gguf_reader_max_abs_weight_diff"] == 0.0
    if types is not None:
        assert {k for k in prov["tensor_types"] if k.startswith("Q")} == types
        assert prov["requantized"] == {}
    ours = load_model(art)
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE)
    text = "The quick brown fox jumps over the lazy dog. 1905 was a year."
    ids = ours.tokenizer(text, add_special_tokens=False).input_ids
    assert tok(text, add_special_tokens=False).input_ids == ids
    x = torch.tensor([ids])
    with torch.inference_mode():
        a, b = ours.model(input_ids=x).logits, theirs(input_ids=x).logits
    if types is not None:  # exact layouts: the same weights, the same logits
        assert (a - b).abs().max() <= 1e-4
    else:  # asymmetric g64 rounded again to Q4_0: another 4-bit model, close to ours but not equal
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert 0.95 <= cos < 1 - 1e-6
        assert prov["requantized"] and max(prov["requantized"].values()) > 0


def test_gguf_export_of_a_float_model_and_loading_it_back(model_dirs, tmp_path):
    out = tmp_path / "f16"
    r = CliRunner().invoke(cli, ["export", str(model_dirs["llama"]), "--format", "gguf", "--float-type", "f16",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(out / GGUF_FILE))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied embeddings: llama.cpp reads token_embd
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    lm = load_model(out)  # a GGUF artifact directory loads (dequantized by transformers)
    ref = load_model(model_dirs["llama"])
    x = torch.tensor([[5, 9, 300, 41, 7]])
    with torch.inference_mode():
        diff = (lm.model(input_ids=x).logits - ref.model(input_ids=x).logits).abs().max()
    assert 0 < diff <= 5e-2  # fp16 matrices: close, not equal


def test_gguf_export_refuses_bad_input_and_writes_nothing(model_dirs, tmp_path):
    art = _quantize(model_dirs["llama"], tmp_path / "art", "--bits", "4", "--group-size", "16")
    out = tmp_path / "g"
    r = CliRunner().invoke(cli, ["export", str(art), "--format", "gguf", "--out", str(out)])
    assert r.exit_code != 0 and "groups of 16" in r.output and "--requantize" in r.output
    assert not out.exists() and not list(tmp_path.glob(".g.tmp-*"))
    r = CliRunner().invoke(cli, ["export", str(model_dirs["opt"]), "--format", "gguf", "--out", str(out)])
    assert r.exit_code != 0 and "'opt'" in r.output and not out.exists()
    r = CliRunner().invoke(cli, ["export", str(model_dirs["llama"]), "--format", "onnx", "--float-type", "f16",
                                 "--out", str(out)])
    assert r.exit_code != 0 and "--float-type applies to --format gguf" in r.output
    bare = tmp_path / "no-tokenizer"  # weights and config only
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((model_dirs["llama"] / f).read_bytes())
    for fmt in ("gguf", "onnx"):
        r = CliRunner().invoke(cli, ["export", str(bare), "--format", fmt, "--out", str(out)])
        assert r.exit_code == 1 and "no tokenizer files" in r.output and not out.exists()


def test_llama_cpp_runs_our_gguf_and_eval_scores_it(model_dirs, tmp_path):
    """Where llama-cpp-python is installed: the built-in check ran in llama.cpp, and `compress eval` scores the
    file in llama.cpp close to the torch artifact (llama.cpp rounds activations to 8 bits, so not equal)."""
    pytest.importorskip("llama_cpp")
    art = _quantize(model_dirs["llama"], tmp_path / "art", "--bits", "4", "--group-size", "32")
    out = tmp_path / "gguf"
    r = CliRunner().invoke(cli, ["export", str(art), "--format", "gguf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "compress.json").read_text())["format_exported"]
    assert 0 < prov["llama_cpp_max_kl"] <= 0.01 and 0 < prov["llama_cpp_max_abs_logit_diff"] <= 0.5
    scores = {}
    for name, model, backend in (("llama.cpp", out, "auto"), ("torch", art, "auto"), ("gguf-torch", out, "torch")):
        res = tmp_path / f"{name}.json"
        r = CliRunner().invoke(cli, ["eval", str(model), "--backend", backend, "--seq-len", "128", "--windows", "4",
                                     "--output", str(res)])
        assert r.exit_code == 0, r.output
        doc = json.loads(res.read_text())
        scores[name] = doc["results"]["wikitext2"]["value"]
        if name == "llama.cpp":
            assert doc["model"]["runtime"] == "llama.cpp" and doc["model"]["format"] == "gguf"
    assert scores["gguf-torch"] == pytest.approx(scores["torch"], rel=1e-5)  # the same weights, dequantized
    assert scores["llama.cpp"] == pytest.approx(scores["torch"], rel=0.02)
    assert scores["llama.cpp"] != scores["torch"]


def test_a_llama_cpp_crash_is_a_clear_error_and_writes_nothing(model_dirs, tmp_path, monkeypatch):
    """llama.cpp runs the check in a child process: when it dies on a signal (here a real SIGSEGV in the child),
    the export fails with a message naming the crash, exits 1 and leaves no output."""
    pytest.importorskip("llama_cpp")
    import subprocess
    import sys

    import export.llama_probe as lp

    real = subprocess.run

    def crashing(cmd, **kw):
        assert cmd[1:3] == ["-m", "export.llama_probe"]
        return real([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], **kw)

    monkeypatch.setattr(lp.subprocess, "run", crashing)
    out = tmp_path / "gguf"
    r = CliRunner().invoke(cli, ["export", str(model_dirs["llama"]), "--format", "gguf", "--out", str(out)])
    assert r.exit_code == 1 and "llama.cpp crashed (SIGSEGV)" in r.output, r.output
    assert "Traceback" not in r.output and not out.exists()
    assert not list(tmp_path.glob("gguf*"))  # no half-written directory either


def test_quantized_head_exports_as_its_own_output_tensor(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    art = _quantize(model_dirs["llama"], tmp_path / "art", "--bits", "4", "--group-size", "32", "--ignore",
                    "model.embed_tokens")
    out = tmp_path / "gguf"
    r = CliRunner().invoke(cli, ["export", str(art), "--format", "gguf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / GGUF_FILE)).tensors}
    assert kinds["output.weight"] == "Q4_0" and kinds["token_embd.weight"] == "F32"
    ours = load_model(art).model
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32)
    x = torch.tensor([[5, 9, 300, 41, 7, 7, 100]])
    with torch.inference_mode():
        assert (ours(input_ids=x).logits - theirs(input_ids=x).logits).abs().max() <= 1e-4


def test_qwen2_exports_with_its_biases_and_pre_tokenizer_and_llama_cpp_agrees(tmp_path, tiny_tokenizer):
    """Qwen2: llama.cpp's qwen2 architecture (NEOX rope: q/k rows not reordered, q/k/v biases) and Qwen2's
    pre-tokenizer split, which transformers 5's Qwen2 tokenizer class puts in front of the byte-level BPE."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tiny_tokenizer) + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1))
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-zero biases too (they start at zero); q and k large
            p.normal_(0, 0.6 if ".q_proj." in name or ".k_proj." in name else 0.08)  # enough that a wrong rope
    model.save_pretrained(tmp_path / "qwen2")  # layout in the file shows in llama.cpp's logits
    tiny_tokenizer.save_pretrained(tmp_path / "qwen2")
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "qwen2"), "--format", "gguf", "--out", str(tmp_path / "gguf")])
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "gguf" / "compress.json").read_text())["format_exported"]
    # float weights: llama.cpp computes what torch does (q/k rows in llama.cpp's llama order instead: 9e-3)
    assert prov["llama_cpp_max_abs_logit_diff"] < 1e-3
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf"))
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= {t.name for t in reader.tensors}
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_sliding_windows_and_norms_in_llama_cpp(tmp_path, tiny_tokenizer, arch):
    """Gemma's (1 + w) norms (stored as 1 + w), soft-capping and a sliding window of 4 on a 40-token input:
    llama.cpp's next-token distributions stay within the export's KL tolerance of transformers' everywhere,
    past the window included (a wrong layer pattern or window moves them by far more)."""
    pytest.importorskip("llama_cpp")
    from test_arch_matrix import save_arch_model

    from compress.models import load_model
    from export.gguf import export_gguf
    from export.llama_probe import probe

    lm = load_model(save_arch_model(arch, tiny_tokenizer, tmp_path / "src", sliding_window=4))
    out = export_gguf(lm, tmp_path / "gguf")
    ids = torch.randint(3, len(tiny_tokenizer), (40,), generator=torch.Generator().manual_seed(3)).tolist()
    [(_, got)] = probe(out / "model.gguf", [("x", ids)])
    with torch.inference_mode():
        ref = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    lp_ref, lp_got = torch.log_softmax(ref, -1), torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)  # (positions,)
    assert float(kl.max()) <= 0.01, kl


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_are_stacked_as_llama_cpp_reads_them(tmp_path, tiny_tokenizer, arch):
    """A float MoE model: llama.cpp (ffn_*_exps stacked per layer, the router as ffn_gate_inp, expert count and
    width in the header) computes transformers' distributions; so the quantized exports differ only by
    llama.cpp's own activation rounding (and the routing flips it causes)."""
    pytest.importorskip("llama_cpp")
    from test_arch_matrix import save_arch_model

    from export.gguf import check_llama_cpp, export_gguf

    lm = load_model(save_arch_model(arch, tiny_tokenizer, tmp_path / "src"))
    out = export_gguf(lm, tmp_path / "gguf")
    reader = gguf.GGUFReader(str(out / GGUF_FILE))
    exps = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors if "_exps" in t.name}
    assert len(exps) == 2 * 3 and all(shape[-1] == 4 for shape in exps.values())  # (in, out, experts) in ggml order
    max_abs, max_kl = check_llama_cpp(out / GGUF_FILE, lm)
    assert max_kl <= 1e-4 and max_abs <= 1e-2, (max_kl, max_abs)
