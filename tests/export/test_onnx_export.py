import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from test_arch_matrix import greedy_with_cache  # noqa: E402

from compress.cli import cli  # noqa: E402
from compress.quantize.qlinear import QuantLinear  # noqa: E402
from compress.quantize.scheme import QuantScheme  # noqa: E402
from export.matmulnbits import block_size_for, matmulnbits_tensors  # noqa: E402


def _run_matmulnbits(m: QuantLinear, x: np.ndarray, level: int) -> np.ndarray:
    """One MatMulNBits node built from `m`'s tensors, run by ONNX Runtime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    t = matmulnbits_tensors(m, np.float32)
    inits = [numpy_helper.from_array(t["B"], "B"), numpy_helper.from_array(t["scales"], "s")]
    inputs = ["x", "B", "s"]
    if "zero_points" in t:
        inits.append(numpy_helper.from_array(t["zero_points"], "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=t["K"], N=t["N"],
                            bits=t["bits"], block_size=t["block_size"], accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], t["N"]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 128, False), (3, 32, True), (3, 48, False),
                                            (8, -1, True), (8, 64, False), (2, 16, False)])
def test_matmulnbits_layout_reproduces_quantlinear(bits, group, sym):
    """Our codes, scales and zero points in MatMulNBits' layout compute what QuantLinear computes."""
    torch.manual_seed(bits * 1000 + group)
    K, N = 160, 24  # 160: g128 leaves a shorter last group, g48 a non-power-of-two group
    scheme = QuantScheme(bits=bits, group_size=group, symmetric=sym, scale_dtype="float16")
    ng = scheme.n_groups(K)
    q = torch.randint(0, 2**bits, (N, K))
    zero = torch.full((N, ng), float(2 ** (bits - 1))) if sym else torch.randint(0, 2**bits, (N, ng)).float()
    scale = torch.rand(N, ng) * 0.05 + 0.01
    m = QuantLinear.from_codes(q, scale, zero, scheme)
    x = torch.randn(5, K)
    ref = m(x).numpy()
    assert np.abs(_run_matmulnbits(m, x.numpy(), 0) - ref).max() <= 1e-4  # float activations: exact
    # int8 activations (the fast 2/8-bit kernels): close, not exact
    assert np.abs(_run_matmulnbits(m, x.numpy(), 4) - ref).max() <= 3e-2 * np.abs(ref).max()


def test_block_sizes():
    assert block_size_for(128) == 128 and block_size_for(48) == 16 and block_size_for(576) == 64
    assert block_size_for(1024) == 256
    with pytest.raises(ValueError, match="group size 24"):
        block_size_for(24)


def test_export_cli_onnx_matches_torch_and_refuses_bad_input(model_dirs, tmp_path):
    runner = CliRunner()
    art, onnx_dir = tmp_path / "w4", tmp_path / "w4-onnx"
    r = runner.invoke(cli, ["quantize", str(model_dirs["llama"]), "--bits", "4", "--group-size", "32", "--asym",
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["export", str(art), "--format", "onnx", "--out", str(onnx_dir)])
    assert r.exit_code == 0, r.output
    s = exported_summary(onnx_dir)
    assert s["matmulnbits_by_bits"] == {"4": 14}  # 2 layers x 7 Linears; lm_head stays float
    check = s["provenance"]["format_exported"]
    assert check["verify_max_abs_logit_diff"] < 1e-3 and check["op"] == "com.microsoft.MatMulNBits"
    assert not any(p.suffix == ".safetensors" for p in onnx_dir.iterdir())
    # greedy decoding through the graph's KV cache picks the tokens the torch artifact picks
    from compress.models import load_model

    model, want = load_model(art).model, [5, 77, 301, 9]
    with torch.inference_mode():
        for _ in range(6):  # greedy in torch: the whole sequence each step
            want.append(int(model(input_ids=torch.tensor([want])).logits[0, -1].argmax()))
    assert greedy_with_cache(onnx_dir, want[:4], 6) == want
    # the artifact's perplexity in ONNX Runtime equals the torch module's
    opts = ["--task", "wikitext2", "--windows", "3", "--seq-len", "64", "--threads", "1"]
    docs = {}
    for name, path in (("torch", art), ("onnx", onnx_dir)):
        out = tmp_path / f"{name}.json"
        r = runner.invoke(cli, ["eval", str(path), *opts, "--output", str(out)])
        assert r.exit_code == 0, r.output
        docs[name] = json.loads(out.read_text())["results"]["wikitext2"]
    assert docs["onnx"]["backend"] == "onnxruntime"
    assert docs["onnx"]["perplexity"] == pytest.approx(docs["torch"]["perplexity"], rel=1e-4)
    # refusals: existing output, a torch load of the ONNX directory, a group size MatMulNBits cannot hold
    r = runner.invoke(cli, ["export", str(art), "--format", "onnx", "--out", str(onnx_dir)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(cli, ["export", str(onnx_dir), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "ONNX model" in r.output
    odd = tmp_path / "g24"
    assert runner.invoke(cli, ["quantize", str(model_dirs["llama"]), "--group-size", "24", "--method", "rtn",
                               "--out", str(odd)]).exit_code == 0
    r = runner.invoke(cli, ["export", str(odd), "--format", "onnx", "--out", str(tmp_path / "g24-onnx")])
    # (24 does not divide 64: stored as groups of 8, which MatMulNBits cannot hold either)
    assert r.exit_code == 1 and "cannot be written as MatMulNBits blocks" in r.output
    assert not (tmp_path / "g24-onnx").exists()


def test_export_fp32_and_8bit_and_opt(model_dirs, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(model_dirs["llama"]), "--format", "onnx", "--out", str(tmp_path / "fp32")])
    assert r.exit_code == 0, r.output
    s = exported_summary(tmp_path / "fp32")
    assert s["matmulnbits_by_bits"] == {} and s["provenance"]["format_exported"]["verify_max_abs_logit_diff"] < 1e-3
    assert s["nodes"] <= 12 * 2 + 20  # the fused graph: about a dozen nodes per layer
    art = tmp_path / "w8"
    assert runner.invoke(cli, ["quantize", str(model_dirs["llama"]), "--bits", "8", "--group-size", "-1",
                               "--method", "rtn", "--out", str(art)]).exit_code == 0
    r = runner.invoke(cli, ["export", str(art), "--format", "onnx", "--out", str(tmp_path / "w8-onnx")])
    assert r.exit_code == 0, r.output
    assert exported_summary(tmp_path / "w8-onnx")["matmulnbits_by_bits"] == {"8": 14}
    # OPT (LayerNorms, learned positions) too; what the graph cannot express is refused (tests/test_arch_matrix.py)
    r = runner.invoke(cli, ["export", str(model_dirs["opt"]), "--format", "onnx", "--out", str(tmp_path / "opt")])
    assert r.exit_code == 0, r.output
    assert exported_summary(tmp_path / "opt")["provenance"]["format_exported"]["verify_max_abs_logit_diff"] < 1e-3


def exported_summary(path) -> dict:
    """What an ONNX artifact holds: MatMulNBits nodes by bits, node count, provenance."""
    import onnx

    proto = onnx.load(str(Path(path) / "model.onnx"), load_external_data=False)
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            bits = next(a.i for a in n.attribute if a.name == "bits")
            counts[str(bits)] = counts.get(str(bits), 0) + 1
    return {"matmulnbits_by_bits": counts, "nodes": len(proto.graph.node),
            "provenance": json.loads((Path(path) / "compress.json").read_text())}


def test_qwen2_with_its_qkv_biases_exports_and_matches_torch(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from compress.models import load_model
    from export.onnx import export_onnx

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases too (they start at zero)
            p.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "qwen2")
    tiny_tokenizer.save_pretrained(tmp_path / "qwen2")
    out = export_onnx(load_model(tmp_path / "qwen2"), tmp_path / "onnx")
    check = exported_summary(out)["provenance"]["format_exported"]
    assert check["verify_max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_windows_hold_in_prefill_and_in_the_kv_cache(tmp_path, tiny_tokenizer, arch):
    """A window of 8 tokens (Mistral: every layer; Gemma: alternate layers, with soft-capping and (1 + w)
    norms) over a 30-token prompt and 12 decoded tokens: the graph attends where transformers attends."""
    import numpy as np
    from test_arch_matrix import save_arch_model

    from compress.models import load_model
    from export.onnx import export_onnx

    lm = load_model(save_arch_model(arch, tiny_tokenizer, tmp_path / "src", sliding_window=8))
    out = export_onnx(lm, tmp_path / "onnx")
    want = torch.randint(3, len(tiny_tokenizer), (30,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        full = lm.model(input_ids=torch.tensor([want])).logits[0]
        for _ in range(12):
            want.append(int(lm.model(input_ids=torch.tensor([want])).logits[0, -1].argmax()))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([want[:30]], np.int64), "attention_mask": np.ones((1, 30), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    got = sess.run(["logits"], feeds)[0][0]
    assert np.abs(got - full.numpy()).max() < 1e-3  # (a window off by one token: about 1)
    assert greedy_with_cache(out, want[:30], 12) == want


@pytest.mark.parametrize("renorm", [False, True])
def test_moe_graph_routes_like_transformers(tmp_path, tiny_tokenizer, renorm):
    """Qwen3-MoE with and without renormalised top-k weights, 4-bit experts: a 40-token prompt whose tokens reach
    every expert, then decoding one token at a time (most experts get no rows): logits and tokens as in torch.
    A router told the wrong way (renormalised or not) moves these logits by > 1e-2."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from compress.models import load_model
    from export.onnx import export_onnx

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96,
                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=renorm,
                         max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "src"), "--method", "rtn", "--group-size", "32",
                                 "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    lm = load_model(tmp_path / "q")
    out = export_onnx(lm, tmp_path / "onnx")
    fmt = exported_summary(out)["provenance"]["format_exported"]
    assert fmt["verify_max_abs_logit_diff"] < 1e-3
    assert fmt["matmulnbits_by_bits"]["4"] == 2 * (4 + 3 * 6)  # q k v o and every expert's three, per layer
    want = torch.randint(3, len(tiny_tokenizer), (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        for _ in range(8):
            want.append(int(lm.model(input_ids=torch.tensor([want])).logits[0, -1].argmax()))
    assert greedy_with_cache(out, want[:40], 8) == want


def test_moe_blocks_the_graph_cannot_express_are_refused_with_the_reason(tiny_tokenizer):
    """A block with more than a router and experts (a shared expert), and a router that is not a softmax top-k."""
    from test_arch_matrix import make_arch_model

    from calibrate.experts import unfuse_experts
    from export.fused_arch import fused_supported

    model = make_arch_model("qwen3_moe", len(tiny_tokenizer))
    unfuse_experts(model)
    assert fused_supported(model) is None
    block = model.model.layers[1].mlp
    block.shared_expert = torch.nn.Linear(4, 4)
    assert "with shared_expert (model.layers.1.mlp)" in fused_supported(model)
    del block.shared_expert
    block.gate.forward = lambda x: (x, torch.sigmoid(x[:, :2]), torch.zeros(len(x), 2, dtype=torch.long))
    assert "not a softmax top-k over experts" in fused_supported(model)


@pytest.mark.parametrize(("arch", "fmt", "words"), [("gpt2", "onnx", "ONNX export does not support model type 'gpt2'"),
                                                    ("opt", "gguf", "llama.cpp has no OPT")])
def test_a_format_that_cannot_hold_the_model_refuses_before_loading_it(tmp_path, tiny_tokenizer, monkeypatch,
                                                                       arch, fmt, words):
    from test_arch_matrix import save_arch_model

    import compress.models

    src = save_arch_model(arch, tiny_tokenizer, tmp_path / "src")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    import compress.runner

    monkeypatch.setattr(compress.models, "load_model", no_load)
    monkeypatch.setattr(compress.runner, "load_model", no_load)
    r = CliRunner().invoke(cli, ["export", str(src), "--format", fmt, "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
    recipe = tmp_path / "rtn.yaml"  # a recipe writing that format: refused before the model loads, too
    recipe.write_text("- pass: rtn\n  group_size: 32\n")
    r = CliRunner().invoke(cli, ["run", str(recipe), str(src), "--format", fmt, "--out", str(tmp_path / "o2")])
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o2").exists()
