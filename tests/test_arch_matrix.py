"""The architecture matrix: a tiny random model per architecture, built from its real transformers config class,
through every pass and exporter. A cell either works, and its numbers are checked, or refuses with the one line
`REFUSED` expects; a traceback, or a refusal where none is expected, fails. `bench/arch_matrix.py --markdown`
writes the README's table from `REFUSED` and `CELLS` (a test checks that the README carries it).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from calibrate.experts import Experts
from compress.cli import cli
from compress.models import load_model

_COMMON = dict(max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, **_COMMON)


def _configs():
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**_LLAMA_LIKE),
        "mistral": lambda: T.MistralConfig(**_LLAMA_LIKE, head_dim=16, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**_LLAMA_LIKE),
        "qwen3": lambda: T.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
        "gemma3_text": lambda: T.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16,
                                                  sliding_window=16),
        "phi3": lambda: T.Phi3Config(**_LLAMA_LIKE),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=64, **_COMMON),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                            num_attention_heads=4, **_COMMON),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=160, n_positions=256, bos_token_id=0,
                                     eos_token_id=1),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, norm_topk_prob=True),  # (as Qwen3-30B-A3B)
        "mixtral": lambda: T.MixtralConfig(**_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
        "bert": lambda: T.BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=256, pad_token_id=2),
    }


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "gpt_neox", "gpt2",
         "qwen3_moe", "mixtral", "bert")
_QK = (".q_proj.", ".k_proj.", ".qkv_proj.", ".query_key_value.", ".c_attn.", ".query.", ".key.")


def make_arch_model(arch: str, vocab: int, seed: int = 0) -> nn.Module:
    """A tiny random `arch` model. q/k weights are large enough that a wrong rotary layout in an exporter
    shows in its logits; norms and biases are moved off the 1 / 0 they start at, so a lost one shows too."""
    from compress.archs import auto_model_class

    torch.manual_seed(seed)
    cfg = _configs()[arch]()
    cfg.vocab_size = vocab
    model = auto_model_class(cfg).from_config(cfg)  # (BERT: the masked LM)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.25 if any(k in f".{name}" for k in _QK) else 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_arch_model(arch: str, tokenizer, path: Path, *, sliding_window: int | None = None) -> Path:
    """`make_arch_model(arch)` saved with `tokenizer` at `path`; with `sliding_window`, every layer that slides
    (Mistral: all of them) looks back that many tokens."""
    model = make_arch_model(arch, len(tokenizer) + 8)
    if sliding_window is not None:
        model.config.sliding_window = sliding_window
        for layer in model.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                layer.self_attn.sliding_window = sliding_window
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CAL = ["--calib-samples", "4", "--calib-seq-len", "64"]
CELLS = {  # column -> the command's arguments after the model (exporters take the rtn artifact)
    "rtn": ["quantize", "--method", "rtn", "--group-size", "32"],
    "gptq": ["quantize", "--method", "gptq", "--group-size", "32", *CAL],
    "awq": ["quantize", "--method", "awq", "--group-size", "32", *CAL],
    "awq+gptq": ["quantize", "--method", "awq+gptq", "--group-size", "32", "--asym", *CAL],
    "w8a8": ["quantize", "--bits", "8", "--activations", "int8", "--smoothquant", "0.5", *CAL],
    "wanda": ["prune", "--method", "wanda", "--sparsity", "0.5", *CAL],
    "sparsegpt 2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *CAL],
    "prune_channels": ["prune", "--structure", "channels", "--ratio", "0.25", *CAL],
    "prune_heads": ["prune", "--structure", "heads", "--ratio", "0.5", *CAL],
    "prune_layers": ["prune", "--structure", "layers", "--ratio", "0.5", *CAL],
    "lora_merge": ["merge-lora"],  # an adapter on every Linear but lm_head (`make_lora_adapter`)
    "distill": ["distill", "--student-layers", "1", "--steps", "3", "--seq-len", "32", "--batch-size", "2"],
    "onnx": ["export", "--format", "onnx"],
    "gguf": ["export", "--format", "gguf"],
}
_QUANTIZERS = ("rtn", "gptq", "awq", "awq+gptq", "w8a8")

_NO_ONNX = ("gpt2",)  # export/onnx_fused.py
_NO_GGUF = ("bert", "gpt2")  # gguf.py
_CONV1D = "Conv1D"
_EXPERTS = "mixture-of-experts experts"
REFUSED: dict[tuple[str, str], str] = {  # (architecture, column) -> what its one-line refusal says
    **{(a, "onnx"): "ONNX export does not support model type" for a in _NO_ONNX},
    **{(a, "gguf"): "GGUF export supports model types" for a in _NO_GGUF},
    ("phi3", "prune_channels"): "fused projections",
    ("phi3", "prune_heads"): "derives its head size",
    ("opt", "prune_heads"): "derives its head size",
    ("gpt_neox", "prune_heads"): "derives its head size",
    ("bert", "prune_heads"): "derives its head size",
    ("bert", "distill"): "masked-LM encoder",
    ("opt", "gguf"): "llama.cpp has no OPT",
    **{("gpt2", c): _CONV1D for c in CELLS if c not in ("distill", "onnx", "gguf")},  # (distill trains them all)
    **{(a, "prune_channels"): _EXPERTS for a in ("qwen3_moe", "mixtral")},
}
WHY = {  # a refusal's words -> the README's short reason
    "ONNX export does not support model type": "not in the fused graph yet",
    "GGUF export supports model types": "not in the GGUF writer yet",
    "fused projections": "fused gate_up_proj",
    "derives its head size": "head size not in config",
    _CONV1D: "Conv1D weights",
    _EXPERTS: "one width per expert",
    "masked-LM encoder": "causal LMs only",
    "llama.cpp has no OPT": "llama.cpp has no OPT",
}
SAME = 1e-4  # logits that must be equal: max |difference| / max(1, max |logit|)


def _ignored(name: str, module: nn.Module) -> bool:
    """Left alone by default: the output head (lm_head, an encoder's masked-LM head)."""
    from compress.targets import DEFAULT_IGNORE, matches

    return any(matches(name, module, p) for p in DEFAULT_IGNORE)


def _hf(path: Path) -> nn.Module:
    """The model at `path` as plain transformers loads it (its Auto class: causal LM or masked LM)."""
    from transformers import AutoConfig

    from compress.archs import auto_model_class

    return auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.fixture(scope="session")
def arch_dir(tmp_path_factory, tiny_tokenizer):
    """arch -> a saved tiny model of it (made on first use)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"matrix-{arch}")
            make_arch_model(arch, len(tiny_tokenizer) + 8).save_pretrained(d)  # (Qwen2's tokenizer adds one)
            tokenizer = copy.deepcopy(tiny_tokenizer)
            if arch == "bert":  # a masked LM is scored by masking tokens in turn
                tokenizer.add_special_tokens({"mask_token": "<mask>"})
            tokenizer.save_pretrained(d)
            made[arch] = d
        return made[arch]

    return get


@pytest.fixture(scope="module")
def ids(tiny_tokenizer) -> torch.Tensor:
    return torch.randint(3, len(tiny_tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _run(args: list[str]):
    r = CliRunner().invoke(cli, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"{' '.join(args)} crashed: {r.exception!r}") from r.exception
    return r


def make_lora_adapter(src: Path, path: Path) -> nn.Module:
    """Save a PEFT LoRA adapter on every Linear of the model at `src` but lm_head, with random non-zero factors
    (a MoE model's fused experts are not Linears in transformers: its adapter covers attention);
    return peft's own merge of it (what `compress merge-lora` must compute)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = _hf(src)
    # every Linear by name: PEFT's "all-linear" also adapts transformers 5's fused experts and routers as
    # parameters (target_parameters), which merge-lora refuses (tests/lora)
    linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                      if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and "lm_head" not in n})
    peft_model = get_peft_model(model, LoraConfig(target_modules=linears, r=4, lora_alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload().eval()


def cell_args(column: str, src: Path, out: Path) -> list[str]:
    """The command line of one cell on the model at `src` (exporters: its rtn artifact) writing `out`; what the
    cell needs first (lora_merge: an adapter) is made beside `out`."""
    cmd = CELLS[column]
    if column == "distill":  # the student is made from the teacher
        return [cmd[0], "--teacher", str(src), *cmd[1:], "--out", str(out)]
    if column == "lora_merge":
        adapter = out.with_name(f"{out.name}-adapter")
        if not adapter.exists():
            make_lora_adapter(src, adapter)
        return [cmd[0], str(src), "--adapter", str(adapter), "--out", str(out)]
    return [cmd[0], str(src), *cmd[1:], "--out", str(out)]


def _cell(arch_dir, tmp_path, arch: str, column: str):
    """Run one cell's command; assert it worked or refused as REFUSED says; the output path (None: refused)."""
    src, out = arch_dir(arch), tmp_path / column.replace(" ", "_").replace(":", "")
    cmd = CELLS[column]
    if cmd[0] == "export":
        art = tmp_path / "rtn-for-export"
        r = _run(["quantize", str(src), *CELLS["rtn"][1:], "--out", str(art)])
        if (arch, "rtn") not in REFUSED:
            assert r.exit_code == 0, r.output
            src = art  # (an architecture with no rtn artifact exports its float model)
    r = _run(cell_args(column, src, out))
    want = REFUSED.get((arch, column))
    if want is None:
        assert r.exit_code == 0, r.output
        return out
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert r.exit_code != 0 and len(errors) == 1 and want in errors[0], r.output
    assert not out.exists()
    return None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("column", [c for c in CELLS if c not in ("onnx", "gguf")])
def test_pass(arch_dir, tmp_path, ids, arch, column):

    out = _cell(arch_dir, tmp_path, arch, column)
    if out is None:
        return
    ours = load_model(out).model
    a = _logits(ours, ids)
    assert torch.isfinite(a).all()
    if column in _QUANTIZERS:
        # compressed-tensors reads the artifact as the same model
        # (W8A8: compressed-tensors rounds the activations itself; measured 1e-3, 1.2e-2 on gemma3_text)
        _check_compressed_tensors(out, a, ids, lambda: load_model(arch_dir(arch)).model,
                                  tol=2e-2 if column == "w8a8" else SAME)
        # and it is a quantized version of the source model, not another one
        f = _logits(load_model(arch_dir(arch)).model, ids)
        cos = torch.nn.functional.cosine_similarity((a - a.mean(-1, keepdim=True)).flatten(),
                                                    (f - f.mean(-1, keepdim=True)).flatten(), dim=0)
        # measured: 0.994-0.999 (MoE 0.988: int8 activations flip the router's near ties); 0.83-0.97
        assert cos > (0.98 if column == "w8a8" else 0.75), float(cos)
    elif column == "wanda":
        for name, m in ours.named_modules():
            if isinstance(m, nn.Linear) and not _ignored(name, m):
                zeros = (m.weight == 0).float().mean(1)  # per output row
                assert torch.all(zeros >= 0.5), name
    elif column == "sparsegpt 2:4":
        for name, m in ours.named_modules():
            if isinstance(m, nn.Linear) and not _ignored(name, m):
                w = m.weight.reshape(m.out_features, -1, 4)
                assert torch.all((w == 0).sum(-1) >= 2), name
    elif column == "lora_merge":  # peft's own merge of the adapter, and transformers loads ours as it
        want = _logits(make_lora_adapter(arch_dir(arch), tmp_path / "again"), ids)
        assert _rel(a, want) <= SAME and _rel(a, _logits(load_model(arch_dir(arch)).model, ids)) > 1e-3
        assert _rel(_logits(_hf(out), ids), a) <= SAME
    elif column == "distill":  # a one-block student, trained (finite losses), that transformers loads as ours
        import json

        assert ours.config.num_hidden_layers == 1
        curve = json.loads((out / "distill_curve.json").read_text())
        losses = [row["loss"] for row in curve["curve"]]
        assert len(losses) == 3 and all(map(math.isfinite, losses)), curve
        assert _rel(_logits(_hf(out), ids), a) <= SAME
    else:  # structured pruning: a smaller model that plain transformers loads as the same model
        src = load_model(arch_dir(arch)).model
        assert sum(p.numel() for p in ours.parameters()) < sum(p.numel() for p in src.parameters())
        theirs = _hf(out)
        assert _rel(_logits(theirs, ids), a) <= SAME


def _check_compressed_tensors(out: Path, ours: torch.Tensor, ids: torch.Tensor, source, *, tol: float) -> None:
    """compressed-tensors' own code reads our artifact as the model we run (logits `ours`): its pack-quantized
    decompressor turns our packed codes, scales and zero points into the weights we multiply by, and
    transformers + compressed-tensors loads the directory and computes our logits."""
    import json
    from importlib.metadata import version

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from compress.models import renamed_as_transformers_loads

    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    model, packed, asym = source(), 0, False
    state = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    state = renamed_as_transformers_loads(model, state, out)  # (Mixtral's checkpoint names: block_sparse_moe)
    with torch.no_grad():
        for scheme in qc.config_groups.values():
            if scheme.format != "pack-quantized":
                continue
            asym |= not scheme.weights.symmetric
            for name in scheme.targets:  # we name every module
                local = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
                local["weight_scale"] = local["weight_scale"].float()  # it would multiply in float16; we do not
                w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
                model.get_submodule(name).weight.copy_(w)
                packed += 1
        params = dict(model.named_parameters())
        quantized = {t for scheme in qc.config_groups.values() for t in scheme.targets}
        for k, v in state.items():
            module, _, leaf = k.rpartition(".")
            if module not in quantized or leaf == "bias":  # norms, embeddings, biases (AWQ folds scales into them)
                params[k].copy_(v)
    if packed:
        assert _rel(_logits(model, ids), ours) <= SAME
    try:
        theirs = _hf(out)
    except RuntimeError as e:
        # transformers 5.25 fuses a mixture-of-experts checkpoint's per-expert `weight`s as it loads, and with
        # compressed-tensors' int-quantized (W8A8) format it finds none to fuse (its "Concatenate ... Ckpt
        # contains: 0"): no W8A8 MoE checkpoint loads there, llm-compressor's included. Ours load in compress.
        if qc.format == "int-quantized" and any(isinstance(m, Experts) for m in model.modules()):
            assert "conversion of the weights" in str(e)
            return
        # compressed-tensors 0.20.1 builds its meta skeleton with an asymmetric zero point unpacked,
        # (out, groups), while the format (and its own compress()) packs it along out: transformers then refuses
        # every asymmetric pack-quantized checkpoint, its own included. Checked above with its decompressor.
        if not asym or version("compressed-tensors") != "0.20.1":
            raise
        return
    assert theirs.config.quantization_config is not None
    for name, m in load_model(out).model.named_modules():
        if not isinstance(m, Experts):
            continue
        # transformers fuses a per-expert checkpoint as it loads; compressed-tensors quantizes only Linears, so
        # it dequantizes each expert's codes into the fused tensors, in the scales' float16: ours, rounded so.
        # (A float16 rounding flips the router's top-k on near ties: the logits are compared with our weights.)
        fused = theirs.get_submodule(name)
        weights = [[getattr(ex, n).dequantize_weight().float() for n in ex.names] for ex in m]  # gate, up, down
        gate_up, down = torch.stack([torch.cat(w[:2]) for w in weights]), torch.stack([w[2] for w in weights])
        assert torch.equal(fused.gate_up_proj, gate_up.to(fused.gate_up_proj.dtype))
        assert torch.equal(fused.down_proj, down.to(fused.down_proj.dtype))
        fused.gate_up_proj.data, fused.down_proj.data = gate_up, down
    assert _rel(_logits(theirs, ids), ours) <= tol


BIT_SCHEMES = [(8, -1, True), (8, 32, False), (4, 32, True), (4, 32, False), (3, 32, True), (3, 32, False),
               (2, 32, True), (2, 32, False)]


def _bit_cases():
    quantizable = [a for a in ARCHS if (a, "rtn") not in REFUSED]
    # every scheme on llama; one per other architecture, in turn
    cases = [("llama", *b) for b in BIT_SCHEMES]
    for i, arch in enumerate(a for a in quantizable if a != "llama"):
        cases.append((arch, *BIT_SCHEMES[(3 * i + 1) % len(BIT_SCHEMES)]))
    return cases


@pytest.mark.parametrize("arch,bits,group,sym", _bit_cases())
def test_rtn_artifact_is_its_dequantized_model_and_compressed_tensors_loads_it(
        arch_dir, tmp_path, ids, arch, bits, group, sym):
    """The artifact computes what the source model computes with every quantized weight replaced by its
    round-to-nearest value (nothing else changed, nothing lost), and transformers + compressed-tensors, which
    unpacks our words with its own code, computes the same logits."""
    from compress.quantize.grid import fake_quantize
    from compress.quantize.qlinear import QuantLinear

    out = tmp_path / "art"
    r = _run(["quantize", str(arch_dir(arch)), "--method", "rtn", "--bits", str(bits), "--group-size", str(group),
              *([] if sym else ["--asym"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    ours = load_model(out).model
    a = _logits(ours, ids)
    ref = load_model(arch_dir(arch)).model
    packed = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert packed and all(m.scheme.bits == bits and m.scheme.symmetric == sym for m in packed.values())
    with torch.no_grad():
        for name, m in packed.items():
            lin = ref.get_submodule(name)
            lin.weight.copy_(fake_quantize(lin.weight.float(), m.scheme))
    assert _rel(a, _logits(ref, ids)) <= SAME
    _check_compressed_tensors(out, a, ids, lambda: load_model(arch_dir(arch)).model, tol=SAME)


@pytest.mark.parametrize("arch", [a for a in ARCHS if (a, "awq") not in REFUSED])
def test_scale_folds_keep_the_function(arch_dir, tmp_path, ids, arch):
    """AWQ's per-channel scales (SmoothQuant folds its factors the same way, `calibrate.fold`), folded into the
    norm (Gemma's (1 + w) form included) or Linear before each stage and into the stage's weights, leave the
    model computing the same function; the attention and MLP inputs of every block are scaled (not skipped for
    want of a producer)."""
    from calibrate.data import CalibConfig
    from compress.recipe import Recipe
    from compress.runner import compress_model

    out, step = tmp_path / "folded", {"pass": "awq", "quantize": False, "clip": False, "group_size": 32}
    summary = compress_model(arch_dir(arch), Recipe.from_steps([step]), out, calib=CalibConfig(samples=4, seq_len=64))
    # two blocks: attention and MLP inputs (BERT: only v -> o; its norms also feed the residual, no fold target)
    assert summary["reports"][0]["metrics"]["scaled_stages"] >= 2 * (1 if arch == "bert" else 2)
    src = load_model(arch_dir(arch)).model
    assert _rel(_logits(load_model(out).model, ids), _logits(src, ids)) <= SAME


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_export(arch_dir, tmp_path, arch, fmt):
    """ONNX: the fused graph's logits match torch's (checked by the exporter on every export); GGUF: the file
    reads back to our weights and llama.cpp's logits match torch's."""
    import json

    if fmt == "gguf":
        pytest.importorskip("llama_cpp")
    out = _cell(arch_dir, tmp_path, arch, fmt)
    if out is None:
        return
    check = json.loads((out / "compress.json").read_text())["format_exported"]
    if fmt == "onnx":
        assert check["verify_max_abs_logit_diff"] < 1e-3
        model, want = load_model(tmp_path / "rtn-for-export").model, [5, 77, 301, 9]
        if arch == "bert":  # an encoder: a padded batch, its padding masked as transformers masks it
            _check_padded_encoder(out, model)
            return
        # greedy decoding through the graph's KV cache picks the tokens the torch artifact picks
        with torch.inference_mode():
            for _ in range(6):  # greedy in torch: the whole sequence each step
                want.append(int(model(input_ids=torch.tensor([want])).logits[0, -1].argmax()))
        assert greedy_with_cache(out, want[:4], 6) == want
    else:  # llama.cpp multiplies Q4_0 blocks by 8-bit activations: close to torch, not equal
        assert check["gguf_reader_max_abs_weight_diff"] == 0.0
        # (MoE: 8-bit activations also flip the router's near ties, measured KL 0.07 on mixtral; float exports of
        # both MoE models agree to KL 1e-6: tests/export/test_gguf_export.py)
        moe = arch in ("qwen3_moe", "mixtral")
        assert check["llama_cpp_max_kl"] <= (0.15 if moe else 0.01)
        assert moe or check["llama_cpp_max_abs_logit_diff"] <= 0.5  # (a flipped route moves one position's logits)


def _check_padded_encoder(onnx_dir, model: nn.Module) -> None:
    """Two sequences of 12 and 7 tokens in one batch, the second padded, with token types: the graph's logits and
    hidden states at every real token equal transformers' (< 1e-3)."""
    import numpy as np
    import onnxruntime as ort

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 4:] = 1
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    sess = ort.InferenceSession(str(Path(onnx_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, hidden = sess.run(["logits", "last_hidden_state"], {"input_ids": ids.numpy(),
                              "attention_mask": mask.numpy(), "token_type_ids": types.numpy()})
    real = mask.bool().numpy()
    assert np.abs(logits - ref.logits.numpy())[real].max() < 1e-3
    assert np.abs(hidden - ref.hidden_states[-1].numpy())[real].max() < 1e-3
    # the padding is masked: changing the padded tokens changes nothing at the real ones
    ids2 = ids.clone()
    ids2[1, 7:] = 5
    other = sess.run(["logits"], {"input_ids": ids2.numpy(), "attention_mask": mask.numpy(),
                                  "token_type_ids": types.numpy()})[0]
    assert np.abs(other - logits)[real].max() < 1e-5


def greedy_with_cache(onnx_dir, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding in ONNX Runtime: the prompt once, then one token per step fed with the returned KV cache."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(onnx_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values")}
    outs = [o.name for o in sess.get_outputs()]
    seq, new = list(ids), list(ids)
    while len(seq) < len(ids) + steps:
        feeds = {"input_ids": np.array([new], np.int64), "attention_mask": np.ones((1, len(seq)), np.int64), **past}
        if "position_ids" in {i.name for i in sess.get_inputs()}:
            feeds["position_ids"] = np.arange(len(seq) - len(new), len(seq))[None]
        got = dict(zip(outs, sess.run(outs, feeds), strict=True))
        past = {k.replace("present", "past_key_values"): v for k, v in got.items() if k.startswith("present")}
        new = [int(got["logits"][0, -1].argmax())]
        seq += new
    return seq


def test_readme_carries_the_generated_matrix():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from arch_matrix import markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown() in readme, "README's architecture matrix is stale: python bench/arch_matrix.py --markdown"
