"""GGUF artifact: llama.cpp's single-file format, our integer weights as Q8_0 / Q4_0 / Q4_1 blocks.

llama.cpp's legacy block types cut each row into blocks of 32 weights along
the input dimension, with one fp16 scale `d` per block:

- Q8_0: int8 codes c,            w = c * d
- Q4_0: 4-bit codes c in [0, 15], w = (c - 8) * d
- Q4_1: 4-bit codes c,            w = c * d + m   (m, the block's offset, fp16)

Our schemes store w = (q - z) * s with fp16 scales (`compress.quantize.scheme`).
Symmetric 8-bit (z = 128) is Q8_0 with c = q - 128; symmetric 4-bit (z = 8)
is Q4_0 with c = q; symmetric 3- and 2-bit codes, shifted to centre on 8, are
Q4_0 too. Asymmetric 2- to 4-bit is Q4_1 with d = s, m = -z * s, exact when
-z * s is an fp16 number (checked group by group). A group of 32k weights
sharing one scale is k blocks repeating it, so group sizes 32, 64, 128 and
per-channel rows of a multiple of 32 all map exactly. Nothing is
re-quantized: the file holds the artifact's own numbers.

What has no exact GGUF form (groups that are not a multiple of 32,
asymmetric 8-bit, offsets fp16 cannot hold, scales outside fp16) is refused,
naming the module; with `requantize=True` those modules are rounded again,
by our own RTN, to symmetric Q8_0 (8-bit) or Q4_0 (fewer bits) with 32-wide
blocks, and the largest weight change is recorded in the provenance.

The architecture table maps Hugging Face model types to llama.cpp's; for
`llama` the rows of q_proj and k_proj are reordered per head (HF rotates
the two halves of a head, llama.cpp adjacent pairs) — a row permutation,
which moves whole rows of codes and scales and changes no number. Tensor
names come from the `gguf` package's table, the tokenizer (GPT-2 style
byte-level BPE) from the model's tokenizer. The written file is read back
with the `gguf` package's reader and every tensor compared with the model's
weights; when llama-cpp-python is installed, llama.cpp also loads it, must
tokenize the check prompts as the model's tokenizer does, and its
next-token distributions must be within a KL tolerance of the torch
model's. Then the directory appears atomically.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.experts import Experts
from compress import artifact
from compress.models import LoadedModel
from compress.registry import register_exporter
from export import VERIFY_PROMPTS, reference_logits
from export.fused_arch import rotary_fraction
from export.gguf_arch import (
    ARCHITECTURES,
    NOT_IN_LLAMA_CPP,
    attention_scale_differs,
    model_name,
    norm_offsets,
    rope_bases,
)
from export.gguf_encode import Encoded, encode_float, encode_quant
from export.gguf_tokenizer import tokenizer_fields

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
FLOAT_TYPES = ("f32", "f16")



def rope_row_order(n_heads: int, rows: int) -> np.ndarray:
    """Row indices taking HF's q/k rows (per head: first half, second half) to llama.cpp's (pairs interleaved).

    New row 2i of a head is old row i, new row 2i + 1 is old row head_dim/2 + i.
    """
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, 2, head_dim // 2).transpose(0, 2, 1).reshape(-1)


def _permute_rows(enc: Encoded, order: np.ndarray) -> Encoded:
    return Encoded(enc.kind, enc.data[order], enc.expect[order], enc.requant_error)


def check_gguf_config(cfg: Any) -> None:
    """Refuse, from the config alone (before the model loads), a model type llama.cpp cannot run."""
    mt = getattr(cfg, "model_type", None)
    if mt in NOT_IN_LLAMA_CPP:
        raise ValueError(f"GGUF export: llama.cpp has no {NOT_IN_LLAMA_CPP[mt]} architecture (model type {mt!r}; "
                         "export it with --format onnx)")
    if mt not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports model types {', '.join(sorted(ARCHITECTURES))}; "
                         f"this model is {mt!r}")


def _check_model(lm: LoadedModel) -> tuple[str, bool]:
    cfg = lm.model.config
    mt = getattr(cfg, "model_type", None)
    check_gguf_config(cfg)
    if isinstance(why := rope_bases(cfg), str):
        raise ValueError(f"GGUF export: {why} is not supported yet")
    if (why := attention_scale_differs(lm.model)) is not None:
        raise ValueError(f"GGUF export: {why}")
    if lm.tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    if any(isinstance(m, Experts) for m in lm.model.modules()) and not getattr(cfg, "norm_topk_prob", True):
        raise ValueError("GGUF export: llama.cpp renormalises the chosen experts' weights to sum to 1; this model "
                         "(norm_topk_prob false) does not")
    from compress.quantize.w8a8linear import W8A8Linear

    w8a8 = [n for n, m in lm.model.named_modules() if isinstance(m, W8A8Linear)]
    if w8a8:
        raise ValueError(f"GGUF has no int8-activation format ({w8a8[0]} and {len(w8a8) - 1} more are W8A8); "
                         "export W8A8 artifacts with --format onnx, or quantize weight-only for GGUF")
    return ARCHITECTURES[mt]


def _tensors(lm: LoadedModel, arch: str, permute_qk: bool, float_type: str,
             requantize: bool) -> dict[str, Encoded]:
    """GGUF name -> encoded tensor for every weight of the model."""
    import gguf

    from compress.quantize.qlinear import QuantLinear

    model, cfg = lm.model, lm.model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    heads = {"q_proj": cfg.num_attention_heads,
             "k_proj": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    out: dict[str, Encoded] = {}

    def add(hf_name: str, enc: Encoded) -> None:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"GGUF export: no llama.cpp tensor name for {hf_name}")
        module = hf_name.rsplit(".", 2)[-2]
        if permute_qk and module in heads:
            enc = _permute_rows(enc, rope_row_order(heads[module], enc.expect.shape[0]))
        if module == "query_key_value":  # GPT-NeoX: per head [q; k; v] rows -> llama.cpp's [all q; all k; all v]
            n = cfg.num_attention_heads
            order = np.arange(enc.expect.shape[0]).reshape(n, 3, -1).transpose(1, 0, 2).reshape(-1)
            enc = _permute_rows(enc, order)
        out[gname] = enc

    # mixture-of-experts: llama.cpp holds each projection of a layer's experts as one (experts, out, in) tensor
    stacked = set()
    for ex_name, ex in ((n, m) for n, m in model.named_modules() if isinstance(m, Experts)):
        for role, canonical in enumerate(("gate_proj", "up_proj", "down_proj")):
            mods = [(f"{ex_name}.{e}.{expert.names[role]}", getattr(expert, expert.names[role]))
                    for e, expert in enumerate(ex)]
            encs = [encode_quant(m, n, requantize=requantize) if n in quant else encode_float(m.weight, float_type)
                    for n, m in mods]
            if len({e.kind for e in encs}) != 1:
                raise ValueError(f"GGUF export: the experts of {ex_name} are stored as {sorted({e.kind for e in encs})}"
                                 f" ({canonical}); llama.cpp keeps one type per layer's experts")
            add(f"{ex_name}.{canonical}.weight", Encoded(encs[0].kind, np.stack([e.data for e in encs]),
                                                         np.stack([e.expect for e in encs]),
                                                         max((e.requant_error for e in encs
                                                              if e.requant_error is not None), default=None)))
            stacked |= {n for n, _ in mods}
    for name, m in quant.items():
        if name in stacked:
            continue
        add(f"{name}.weight", encode_quant(m, name, requantize=requantize))
        if m.bias is not None:
            add(f"{name}.bias", encode_float(m.bias, float_type))
    skip = {f"{n}.{b}" for n in (*quant, *stacked) for b in ("weight", "weight_packed", "weight_scale",
                                                             "weight_zero_point", "weight_shape", "bias")}
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and "lm_head" not in quant
    offsets = norm_offsets(model)
    for key, t in model.state_dict().items():
        if key in skip or (tied and key == "lm_head.weight"):  # tied: llama.cpp reads token_embd
            continue
        if not t.is_floating_point():
            raise ValueError(f"GGUF export: unexpected non-float tensor {key} ({t.dtype})")
        add(key, encode_float(t.float() + offsets[key] if key in offsets else t, float_type))
    return out


def write_gguf(lm: LoadedModel, path: Path, tensors: dict[str, Encoded], arch: str, tok: dict[str, Any],
               provenance: dict[str, Any]) -> None:
    import gguf

    cfg = lm.model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(model_name(Path(str(provenance["source"]["path"])).name or "model", tok["tokens"]))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(int(head_dim * rotary_fraction(cfg)))  # (GPT-NeoX rotates a quarter)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    bases = rope_bases(cfg)
    w.add_rope_freq_base(bases.get(None, bases.get("full_attention")))
    if "sliding_attention" in bases:
        w.add_rope_freq_base_swa(bases["sliding_attention"])
    if hasattr(cfg, "rms_norm_eps"):
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    else:  # LayerNorm models (GPT-NeoX)
        w.add_layer_norm_eps(float(cfg.layer_norm_eps))
    if hasattr(cfg, "use_parallel_residual"):
        w.add_parallel_residual(bool(cfg.use_parallel_residual))
    experts = next((m for m in lm.model.modules() if isinstance(m, Experts)), None)
    if experts is not None:  # mixture of experts: how many, how many per token, each one's width
        w.add_expert_count(len(experts))
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
        w.add_expert_feed_forward_length(getattr(experts[0], experts[0].names[0]).out_features)
    if getattr(cfg, "layer_types", None) and getattr(cfg, "sliding_window", None):  # which layers slide, each
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    for key, add_cap in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
        if getattr(cfg, key, None):
            add_cap(float(getattr(cfg, key)))
    w.add_vocab_size(len(tok["tokens"]))
    kinds = [e.kind for e in tensors.values() if e.expect.ndim == 2]
    quant_kinds = [k for k in kinds if k.startswith("Q")]
    main = max(set(quant_kinds), key=quant_kinds.count) if quant_kinds else ("F16" if "F16" in kinds else "F32")
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
                     "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K}[main])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    w.add_add_bos_token(bool(tok["add_bos"]))
    w.add_add_eos_token(False)
    if isinstance(tok["chat_template"], str):
        w.add_chat_template(tok["chat_template"])
    w.add_string("compress.provenance", json.dumps(provenance))
    for name, enc in tensors.items():
        if enc.kind.startswith("Q"):
            w.add_tensor(name, enc.data, raw_dtype=gguf.GGMLQuantizationType[enc.kind])
        else:
            w.add_tensor(name, enc.data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_file(path: Path, tensors: dict[str, Encoded]) -> float:
    """Read the file back with the gguf package and decode every tensor; max |decoded - expected| (0 = exact)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(tensors):
        raise ValueError(f"GGUF check: the file holds tensors {sorted(set(found) ^ set(tensors))[:5]} "
                         "other than those written")
    worst = 0.0
    for name, enc in tensors.items():
        t = found[name]
        if t.tensor_type.name != enc.kind:
            raise ValueError(f"GGUF check: {name} is {t.tensor_type.name} in the file, expected {enc.kind}")
        got = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(enc.expect.shape)
        worst = max(worst, float(np.abs(got - enc.expect).max()) if got.size else 0.0)
    return worst


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def check_llama_cpp(path: Path, lm: LoadedModel, *, threads: int | None = None) -> tuple[float, float]:
    """Load the file in llama.cpp: it must tokenize the check prompts as the model's tokenizer does. Returns the
    largest |logit difference| and the largest KL divergence (nats) of llama.cpp's next-token distribution from
    the torch model's, over every position of the prompts. llama.cpp runs in a child process
    (`export.llama_probe`): a crash there is a clear error, not the end of this process."""
    from export.llama_probe import probe

    refs = list(reference_logits(lm))
    worst, worst_kl = 0.0, 0.0
    # in a child process: a file llama.cpp cannot handle may crash it, which must not take this command down
    for (text, ids, ref), (theirs, got) in zip(refs, probe(path, [(t, list(i)) for t, i, _ in refs],
                                                             threads=threads), strict=True):
        if theirs != list(ids):
            raise ValueError(f"GGUF check: llama.cpp tokenizes {text!r} as {theirs[:12]}, the model's "
                             f"tokenizer as {list(ids)[:12]}; nothing was written")
        got = torch.from_numpy(got)
        worst = max(worst, float((got - ref).abs().max()))
        lp_ref, lp_got = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
        kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)  # KL(torch || llama.cpp) per position
        worst_kl = max(worst_kl, float(kl.max()))
    return worst, worst_kl


@register_exporter("gguf", check_config=check_gguf_config)
def export_gguf(lm: LoadedModel, out: str | Path, *, recipe: list[dict[str, Any]] | None = None,
                reports: list[Any] = (), force: bool = False, float_type: str = "f32",
                requantize: bool = False, tolerance: float | None = None, threads: int | None = None) -> Path:
    """llama.cpp GGUF file (in a directory with compress.json): our integer weights as Q8_0/Q4_0/Q4_1 blocks."""
    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to overwrite it")
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    arch, permute_qk = _check_model(lm)
    from compress.lazy import store_of

    if store_of(lm.model) is not None:
        raise ValueError("GGUF export needs the whole model in memory; load it without lazy=True")
    tensors = _tensors(lm, arch, permute_qk, float_type, requantize)
    n_vocab = lm.model.get_input_embeddings().num_embeddings
    requant = {n: e.requant_error for n, e in tensors.items() if e.requant_error is not None}
    prev = lm.provenance
    prov = artifact.provenance(
        source=lm.source_record(),
        recipe=(prev.get("recipe", []) if prev else []) + list(recipe or []),
        reports=[r.to_dict() if hasattr(r, "to_dict") else r for r in reports],
        quantization=prev.get("quantization") if prev else None, previous=prev)
    types: dict[str, int] = {}
    for e in tensors.values():
        types[e.kind] = types.get(e.kind, 0) + 1
    with tempfile.TemporaryDirectory(prefix="compress-gguf-") as tmp:
        tok = tokenizer_fields(lm, n_vocab, Path(tmp))
        with artifact.atomic_dir(out, force=force) as dest:
            write_gguf(lm, dest / GGUF_FILE, tensors, arch, tok, prov)
            diff = check_file(dest / GGUF_FILE, tensors)
            if diff != 0.0:
                raise ValueError(f"GGUF check failed: a tensor read back differs by {diff:.3g}; nothing was written")
            check: dict[str, Any] = {"gguf_reader_max_abs_weight_diff": diff}
            if llama_cpp_available():
                ldiff, lkl = check_llama_cpp(dest / GGUF_FILE, lm, threads=threads)
                # A distribution check, not a logit one: llama.cpp rounds activations to 8 bits per block before
                # its quantized matmuls, which moves single logits by up to ~4 on the reference model while the
                # next-token distributions stay within KL 0.02; a wrong layout gives several nats.
                quantized = bool(types.keys() & {"Q4_0", "Q4_1", "Q8_0"})
                tol = tolerance if tolerance is not None else (0.1 if quantized else 1e-3)
                if not lkl <= tol:
                    raise ValueError(f"GGUF check failed: llama.cpp's next-token distributions differ from the torch "
                                     f"model's by KL {lkl:.3g} nats (tolerance {tol:g}; largest logit difference "
                                     f"{ldiff:.3g}); nothing was written")
                check.update({"llama_cpp_max_kl": lkl, "llama_cpp_max_abs_logit_diff": ldiff,
                              "llama_cpp_kl_tolerance": tol, "verify_prompts": len(VERIFY_PROMPTS)})
            else:
                log.warning("llama-cpp-python is not installed: the GGUF file was checked by reading it "
                            "back, not by running it in llama.cpp")
            prov["format_exported"] = {"format": "gguf", "file": GGUF_FILE, "architecture": arch,
                                       "tensor_types": dict(sorted(types.items())), "float_type": float_type,
                                       "requantized": {k: v for k, v in sorted(requant.items())},
                                       "tokenizer_pre": tok["pre"], **check}
            artifact.write_json_atomic(dest / artifact.PROVENANCE_FILE, prov)
    return out

