"""Run one peer toolkit's weight quantizer on a model and score it under our perplexity protocol.

Runs inside `.venv-peers/bin/python` (see bench/peers/setup.sh) and never
imports our own packages: the calibration and evaluation token windows come
ready-made from bench/quantize_reference.py as safetensors files, so every
peer sees exactly the tokens our methods see.

    run_peer.py --method {none,hqq,bnb-nf4,llmc-gptq,llmc-awq,autoround,autoround-light} --bits B --group G \\
        --model DIR --calib CALIB.safetensors --eval EVAL.safetensors --out RESULT.json \\
        [--threads 2] [--work DIR] [--asym]
    run_peer.py --method {llmc-sparsegpt,llmc-wanda} --sparsity-spec {0.5,2:4} --model ... (pruning)

CALIB holds `ids` (samples, seq_len) int64, EVAL holds `windows` (n, seq_len)
int64. Perplexity = exp(sum of NLL over every predicted token / their count):
for each window, logits at positions 0..L-2 predict tokens 1..L-1, no BOS,
float32 logits. The quantize time covers the quantizer only (not loading, not
scoring); the peak RSS is the process's VmHWM right after quantization (as in our
bench) and again at the end. Bits per weight count what the tool actually stores for
the quantized Linear modules (the JSON's bits_note says how). On failure the
JSON carries "error" and the exit status is 1.

AutoRound (Intel's auto-round, SignRound): `autoround` is its default recipe (iters 200,
lr 1/iters), `autoround-light` its light recipe (iters 50, lr 5e-3), both read at run
time from the installed package's CLI presets (auto_round.cli.main.RECIPES), calibrated
on our windows (nsamples and seqlen from CALIB, the preset's batch size 8), never on
its default data set; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set so nothing can be
downloaded. Scored on the fake-quantized (qdq) model AutoRound leaves in memory;
bits per weight from its packed checkpoint saved afterwards (format auto_round, or
auto_round:auto_gptq for int4 asymmetric: see run_autoround). --iters is for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

PRUNERS = ("llmc-sparsegpt", "llmc-wanda")  # pruning peers for bench/prune_reference.py (--sparsity-spec)
AUTOROUND = {"autoround": "default", "autoround-light": "light"}  # method -> preset of the auto-round CLI
METHODS = ("none", "hqq", "bnb-nf4", "llmc-gptq", "llmc-awq", *AUTOROUND, *PRUNERS)
ASYM_METHODS = ("llmc-gptq", "llmc-awq", *AUTOROUND)  # the quantizers with a symmetric/asymmetric choice
PEER_PACKAGE = {"none": None, "hqq": "hqq", "bnb-nf4": "bitsandbytes",
                "llmc-gptq": "llmcompressor", "llmc-awq": "llmcompressor",
                "autoround": "auto-round", "autoround-light": "auto-round",
                "llmc-sparsegpt": "llmcompressor", "llmc-wanda": "llmcompressor"}
# auto-round 0.15.1's presets (auto_round/cli/main.py RECIPES: the `auto-round` and `auto-round-light` commands),
# used only when the installed package no longer exposes RECIPES; lr None = SignRoundConfig's 1/iters
AUTOROUND_PRESETS = {"default": {"batch_size": 8, "iters": 200, "seqlen": 2048, "nsamples": 128, "lr": None},
                     "light": {"batch_size": 8, "iters": 50, "seqlen": 2048, "nsamples": 128, "lr": 5e-3}}


def rss_bytes() -> int:
    """This process's peak resident set size so far.

    Read from VmHWM in /proc/self/status, not from ru_maxrss: Linux carries
    ru_maxrss over fork and exec, so a process started by a bigger parent (the
    bench driver, which has read the data) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: ru_maxrss (KiB on Linux)


def version(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def decoder_linears(model) -> list[tuple[str, object]]:
    """Every nn.Linear inside the decoder blocks (so never lm_head)."""
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def set_module(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


# --- perplexity ---------------------------------------------------------------

def perplexity(model, windows) -> tuple[float, int]:
    """exp(mean NLL) over every predicted token of `windows` (n, L), one window per forward."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            total += float(nll.double().sum())
            count += nll.numel()
    return math.exp(total / count), count


# --- HQQ ----------------------------------------------------------------------

def run_hqq(model, bits: int, group: int, calib) -> dict:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)  # axis=1: groups along the input dimension
    linears = decoder_linears(model)
    t0 = time.perf_counter()
    for name, lin in linears:
        set_module(model, name, HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu", del_orig=True))
    seconds = time.perf_counter() - t0
    rss = rss_bytes()
    n_w = n_b = 0
    for name, _ in linears:
        q = model.get_submodule(name)
        n_w += q.in_features * q.out_features
        tensors = [q.W_q] + [v for v in q.meta.values() if torch.is_tensor(v)]
        for sub in ("meta_scale", "meta_zero"):  # quantized / offloaded meta (deprecated options, off here)
            if isinstance(q.meta.get(sub), dict):
                tensors += [v for v in q.meta[sub].values() if torch.is_tensor(v)]
        n_b += sum(t.numel() * t.element_size() * 8 for t in tensors)
    meta_dtypes = sorted({str(v.dtype) for v in model.get_submodule(linears[0][0]).meta.values() if torch.is_tensor(v)})
    q0 = model.get_submodule(linears[0][0])
    return {
        "quantize_seconds": seconds, "peak_rss_bytes": rss, "bits_per_weight": n_b / n_w,
        "symmetric": False, "quantized_modules": len(linears), "quantized_weights": n_w,
        "bits_note": ("HQQ in memory: bytes of W_q (packing " + str(q0.meta["packing"]) + ") plus every tensor "
                      f"in HQQLinear.meta (scale and zero, dtype {meta_dtypes}; no quantized/offloaded meta) "
                      "over the quantized Linears, divided by their weights"),
        "notes": ["HQQ is affine (scale and zero point per group); BaseQuantizeConfig defaults: axis=1, "
                  "optimize=True, round_zero=" + str(bits == 4) + ", meta not quantized",
                  "HQQLinear on every Linear of the decoder blocks, compute_dtype float32, device cpu, "
                  "PyTorch backend (dequantize then matmul); lm_head and embeddings stay float32",
                  "data-free: the calibration windows are not used"],
    }


# --- bitsandbytes NF4 -----------------------------------------------------------

def run_bnb(model, bits: int, group: int, calib) -> dict:
    import bitsandbytes as bnb
    import torch

    if bits != 4:
        raise ValueError(f"bnb-nf4 is 4-bit only, got --bits {bits}")
    linears = decoder_linears(model)
    t0 = time.perf_counter()
    for name, lin in linears:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4",
                              quant_storage=torch.uint8, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=group,
                                     compress_statistics=False, quant_type="nf4",
                                     quant_storage=torch.uint8).to("cpu")  # .to() quantizes
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        # On CPUs with AVX512-BF16 bnb repacks the weight at the first eval-mode forward and turns
        # absmax and the compute into bfloat16; keep the generic path so the compute stays float32
        # (checked: output equals x @ dequantize_4bit(W).T in float32 exactly).
        q.support_avx512bf16_for_cpu = False
        set_module(model, name, q)
    seconds = time.perf_counter() - t0
    rss = rss_bytes()
    n_w = n_b = 0
    for name, _ in linears:
        q = model.get_submodule(name)
        st = q.weight.quant_state
        n_w += q.in_features * q.out_features
        tensors = [q.weight.data, st.absmax]
        if st.nested:
            tensors += [st.state2.absmax, st.offset]
        n_b += sum(t.numel() * t.element_size() * 8 for t in tensors)
    st = model.get_submodule(linears[0][0]).weight.quant_state
    return {
        "quantize_seconds": seconds, "peak_rss_bytes": rss, "bits_per_weight": n_b / n_w,
        "symmetric": True, "quantized_modules": len(linears), "quantized_weights": n_w,
        "bits_note": (f"bitsandbytes in memory: bytes of Params4bit storage ({q.weight.data.dtype}) plus "
                      f"quant_state.absmax ({st.absmax.dtype}, one per {st.blocksize} weights; no nested "
                      "statistics) over the quantized Linears, divided by their weights; the 16-entry NF4 "
                      "code table, shared by all layers, is not counted"),
        "notes": ["NF4: absmax-scaled 16-value normal-float code book per block (symmetric, no zero point), "
                  f"blocksize {st.blocksize}, compress_statistics (double quant) off",
                  "bnb.nn.Linear4bit replacing every Linear of the decoder blocks, compute_dtype float32, "
                  "support_avx512bf16_for_cpu disabled so the CPU path does not switch to bfloat16; "
                  "lm_head and embeddings stay float32",
                  "data-free: the calibration windows are not used"],
    }


# --- llm-compressor ------------------------------------------------------------

def run_llmc(model, bits: int, group: int, calib, *, awq: bool, work: Path, symmetric: bool = True):
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group))
    extra_notes = []
    if awq:
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.accelerator.is_available():
            # AWQ's smoothing pins its cached block inputs (a host-to-device transfer speed-up); on a
            # machine without an accelerator torch refuses with "Cannot access accelerator device
            # when none is available". Pinning changes no value, so skip it here.
            IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
            extra_notes.append("IntermediatesCache.pin_memory patched to a no-op (no accelerator: "
                               "llm-compressor's AWQ otherwise fails with 'RuntimeError: Cannot access "
                               "accelerator device when none is available'); pinning changes no values")
        recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    else:
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    n, seq_len = calib.shape
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seq_len,
            shuffle_calibration_samples=False, tokenizer=model.config.name_or_path)
    seconds = time.perf_counter() - t0
    res = {
        "quantize_seconds": seconds, "peak_rss_bytes": rss_bytes(), "symmetric": symmetric,
        "notes": [("AWQModifier() (default Llama mappings, duo_scaling, n_grid 20) then QuantizationModifier"
                   if awq else
                   "GPTQModifier defaults: block_size 128, dampening_frac 0.01, actorder static"),
                  f"config_groups: int{bits} {'symmetric' if symmetric else 'asymmetric (zero points)'}, "
                  f"strategy group, group_size {group}, targets Linear, "
                  "ignore lm_head",
                  f"calibration: {n} windows x {seq_len} tokens given as a datasets.Dataset "
                  "(input_ids, attention_mask), unshuffled",
                  "perplexity scored on the in-memory model after oneshot (compressed-tensors fake-quantized "
                  "weights), before saving (save_pretrained compresses the model in place)",
                  "lm_head and embeddings stay float32", *extra_notes],
    }

    def after_eval() -> dict:
        out = work / "llmc-compressed"
        model.save_pretrained(out, save_compressed=True)
        return llmc_bits(out)

    return res, after_eval


# --- AutoRound ------------------------------------------------------------------

def autoround_preset(name: str) -> tuple[dict, str]:
    """The installed auto-round's CLI preset `name` ("default", "light"), and where it came from."""
    try:
        from auto_round.cli.main import RECIPES
    except ImportError:
        return dict(AUTOROUND_PRESETS[name]), "bench/peers/run_peer.py AUTOROUND_PRESETS (auto-round 0.15.1's)"
    return dict(RECIPES[name]), f"auto_round.cli.main.RECIPES[{name!r}] of the installed auto-round"


def run_autoround(model, bits: int, group: int, calib, *, preset: str, symmetric: bool, work: Path,
                  model_dir: str, iters: int | None = None, torch_compile: bool | None = None):
    """AutoRound (SignRound) on every Linear of the decoder blocks, calibrated on `calib` only.

    Returns (result, after_eval, model to score): the scored model is AutoRound's in-memory
    fake-quantized one, or, where AutoRound tuned in bfloat16 (CPUs with AVX512-BF16: it then casts
    the whole model), a fresh float32 copy with its quantized weights, so that embeddings, norms and
    lm_head stay float32 as for every other row.
    """
    import torch
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    recipe, recipe_from = autoround_preset(preset)
    n, seq_len = calib.shape
    bs = int(recipe["batch_size"])
    n_iters = int(recipe["iters"]) if iters is None else iters
    lr = recipe["lr"]
    # The format of auto-round's own calibration loader (calib_dataset.get_dataloader): dicts of input_ids and
    # attention_mask, `bs` rows each. A list (not a data set name) is used as given: nothing is downloaded.
    data = [{"input_ids": calib[i : i + bs].clone(), "attention_mask": torch.ones_like(calib[i : i + bs])}
            for i in range(0, n, bs)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_hits = int((calib == tok.pad_token_id).sum()) if tok.pad_token_id is not None else 0
    names = [name for name, _ in decoder_linears(model)]
    n_w = sum(lin.in_features * lin.out_features for _, lin in decoder_linears(model))
    kwargs = {} if lr is None else {"lr": lr}
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, bits=bits, group_size=group, sym=symmetric, iters=n_iters,
                   nsamples=n, seqlen=seq_len, batch_size=bs, dataset=data, device_map="cpu",
                   enable_torch_compile=torch_compile, **kwargs)
    init_seconds = time.perf_counter() - t0
    qmodel, _ = ar.quantize()  # (model, layer_config)
    seconds = time.perf_counter() - t0
    rss = rss_bytes()
    qc = ar.quantize_config
    quantized = sorted(name for name, m in qmodel.named_modules()
                       if isinstance(m, torch.nn.Linear) and (getattr(m, "bits", None) or 16) < 16)
    if quantized != sorted(names):
        raise RuntimeError(f"AutoRound quantized {len(quantized)} Linears, expected the {len(names)} of the "
                           f"decoder blocks (extra: {sorted(set(quantized) - set(names))[:5]}, "
                           f"missing: {sorted(set(names) - set(quantized))[:5]})")
    q0 = qmodel.get_submodule(names[0])
    tune_dtype = str(ar.model_context.amp_dtype)
    scored = qmodel
    if any(p.dtype != torch.float32 for p in qmodel.parameters()):  # bf16 amp: score a float32 copy instead
        scored = load_model(model_dir)
        with torch.no_grad():
            for name in names:
                scored.get_submodule(name).weight.copy_(qmodel.get_submodule(name).weight.float())
    grid = ("symmetric (int_sym: signed levels -2^(b-1)..2^(b-1)-1, scale = max|w| / 2^(b-1), no zero point "
            "in the arithmetic)" if symmetric else "asymmetric (int_asym: scale and zero point per group)")
    scheme = f"int{bits} {grid}, group_size {group}, scale dtype {q0.scale.dtype}"
    # Format "auto_round" packs int4 asymmetric layers AWQ-style, which fails in auto-round 0.15.1
    # (pack_layer passes weight_dtype= to WQLinear_GEMM, whose __init__ has no such argument); its
    # GPTQ-style packing (what "auto_round" picks for the symmetric grids) stores the same tensors:
    # qweight (bits per weight), qzeros (bits per group), float16 scales (16 bits per group).
    fmt = "auto_round:auto_gptq" if bits == 4 and not symmetric else "auto_round"
    on_off = "on" if ar.enable_torch_compile else "off"
    compile_note = (f"torch.compile {on_off} (AutoRound's default: on for iters >= 10 outside Windows)"
                    if torch_compile is None else f"torch.compile forced {on_off}")
    res = {
        "quantize_seconds": seconds, "peak_rss_bytes": rss, "symmetric": symmetric,
        "quantized_modules": len(quantized), "quantized_weights": n_w,
        "autoround": {"preset": preset, "preset_values": recipe, "preset_from": recipe_from,
                      "iters": qc.iters, "lr": qc.lr, "minmax_lr": qc.minmax_lr, "batch_size": bs,
                      "nsamples": n, "seqlen": seq_len, "data_type": qc.data_type, "bits": qc.bits,
                      "group_size": qc.group_size, "sym": qc.sym,
                      "enable_minmax_tuning": qc.enable_minmax_tuning,
                      "enable_quanted_input": qc.enable_quanted_input, "nblocks": qc.nblocks,
                      "gradient_accumulate_steps": qc.gradient_accumulate_steps, "momentum": qc.momentum,
                      "not_use_best_mse": qc.not_use_best_mse, "seed": ar.seed,
                      "tuning_dtype": tune_dtype, "amp": bool(ar.model_context.amp),
                      "torch_compile": bool(ar.enable_torch_compile),
                      "iters_overridden": iters is not None, "init_seconds": round(init_seconds, 2)},
        "notes": [f"AutoRound(model, tokenizer, bits={bits}, group_size={group}, sym={symmetric}, iters={n_iters}, "
                  + ("" if lr is None else f"lr={lr}, ")
                  + f"nsamples={n}, seqlen={seq_len}, batch_size={bs}, dataset=<{len(data)} dicts of our "
                  f"calibration windows>, device_map='cpu', enable_torch_compile={torch_compile}).quantize(); "
                  f"preset {preset!r} from {recipe_from}: {recipe} (seqlen and nsamples: ours, from the "
                  "calibration file); every other SignRoundConfig field at its default",
                  f"SignRound: signed-gradient descent on per-weight rounding offsets and per-group min/max scale "
                  f"factors, block by block, lr {qc.lr} (minmax_lr {qc.minmax_lr}), linear lr decay, the "
                  "lowest-loss iteration kept, each block fed the previous quantized blocks' output",
                  f"grid: {scheme}; all {len(quantized)} Linears of the decoder blocks, lm_head and "
                  "embeddings not quantized (float32)",
                  f"calibration: {n} windows x {seq_len} tokens as {len(data)} dicts (input_ids, "
                  f"attention_mask of ones), unshuffled; AutoRound itself masks the last position of every "
                  f"window (attention and loss) and excludes the pad id {tok.pad_token_id} from the loss "
                  f"({pad_hits} calibration tokens are that id)",
                  f"tuning dtype {tune_dtype} (AutoRound's amp default: bfloat16 on CPUs with AVX512-BF16, "
                  f"else float32), {compile_note}",
                  "quantize_seconds: AutoRound() construction plus quantize() (calibration forwards and "
                  "tuning), not saving",
                  "perplexity scored on the fake-quantized (qdq) model that quantize() leaves in memory: each "
                  "quantized Linear's float32 weight holds scale * q (symmetric) or scale * (q - zero), "
                  f"with the stored {q0.scale.dtype} scales" + ("" if scored is qmodel else
                  "; AutoRound had cast the whole model to " + tune_dtype + ", so these weights were copied into "
                  "a fresh float32 load of the model (embeddings, norms, lm_head float32)")
                  + f"; then saved with save_quantized(format={fmt!r}), which packs the model in place"
                  + ("" if fmt == "auto_round" else " (format 'auto_round' would pack int4 asymmetric AWQ-style, "
                     "which fails in auto-round 0.15.1: WQLinear_GEMM gets an unexpected weight_dtype argument)"),
                  *(["SMOKE TEST: iters overridden by --iters"] if iters is not None else [])],
    }

    def after_eval() -> dict:
        out = work / "autoround"
        ar.save_quantized(str(out), format=fmt, inplace=True)
        return autoround_bits(out, names, n_w, fmt)

    return res, after_eval, scored


def autoround_bits(out: Path, names: list[str], n_w: int, fmt: str) -> dict:
    """Bits per weight of the quantized Linears from AutoRound's packed auto_round checkpoint on disk."""
    from safetensors import safe_open

    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    n_b = 0
    found: set[str] = set()
    dtypes: dict[str, str] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            keys = set(fh.keys())
            for m in names:
                for t in ("qweight", "scales", "qzeros", "g_idx"):
                    if f"{m}.{t}" in keys:
                        x = fh.get_tensor(f"{m}.{t}")
                        n_b += x.numel() * x.element_size() * 8
                        dtypes.setdefault(t, str(x.dtype))
                        found.add(m)
    if sorted(found) != sorted(names):
        raise RuntimeError(f"packed weights of {len(found)} of the {len(names)} quantized Linears found in {out}")
    return {
        "bits_per_weight": n_b / n_w,
        "bits_note": (f"packed checkpoint (save_quantized format {fmt!r}, packing_format "
                      f"{qc.get('packing_format')!r}): bytes of qweight + scales + qzeros (+ g_idx where present) "
                      f"tensors (dtypes {dtypes}) of the quantized Linear modules in the safetensors on disk, "
                      "divided by their weights; qzeros are stored (packed, bits per group) even for the "
                      "symmetric grid"),
        "quantization_config": qc,
    }


def run_llmc_prune(model, spec: str, calib, *, wanda: bool) -> dict:
    """llm-compressor's SparseGPTModifier / WandaPruningModifier at a fraction ("0.5") or N:M ("2:4")."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    if wanda:
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier as Modifier
    else:
        try:
            from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier as Modifier
        except ImportError:  # older layout
            from llmcompressor.modifiers.obcq import SparseGPTModifier as Modifier
    if ":" in spec:
        keep, m = (int(x) for x in spec.split(":"))
        sparsity, structure = 1 - keep / m, spec
    else:
        sparsity, structure = float(spec), "0:0"
    modifier = Modifier(sparsity=sparsity, mask_structure=structure, ignore=["lm_head"])
    n, seq_len = calib.shape
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=n, max_seq_length=seq_len,
            shuffle_calibration_samples=False, tokenizer=model.config.name_or_path)
    seconds = time.perf_counter() - t0
    rss = rss_bytes()
    fractions = {name: float((lin.weight == 0).float().mean()) for name, lin in decoder_linears(model)}
    total = sum(lin.weight.numel() for _, lin in decoder_linears(model))
    zeros = sum(float((lin.weight == 0).sum()) for _, lin in decoder_linears(model))
    return {
        "quantize_seconds": seconds, "peak_rss_bytes": rss, "sparsity": zeros / total,
        "layer_sparsity_min": min(fractions.values()), "layer_sparsity_max": max(fractions.values()),
        "zeros_per_module": fractions, "bits_per_weight": 32.0, "symmetric": None,
        "bits_note": "pruned float32 weights (dense storage)",
        "notes": [f"{Modifier.__name__}(sparsity={sparsity:g}, mask_structure={structure!r}, ignore=['lm_head']), "
                  "other fields at their defaults",
                  f"calibration: {n} windows x {seq_len} tokens given as a datasets.Dataset "
                  "(input_ids, attention_mask), unshuffled",
                  "quantize_seconds is the pruning time (oneshot); perplexity scored on the in-memory model"],
    }


def llmc_bits(out: Path) -> dict:
    """Bits per weight of the quantized Linears from a compressed-tensors checkpoint on disk."""
    from safetensors import safe_open

    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    n_w = n_b = 0
    mods: set[str] = set()
    dtypes: dict[str, str] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            keys = set(fh.keys())
            here = {k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")}
            mods |= here
            for m in sorted(here):
                for t in ("weight_packed", "weight_scale", "weight_zero_point"):
                    if f"{m}.{t}" in keys:
                        x = fh.get_tensor(f"{m}.{t}")
                        n_b += x.numel() * x.element_size() * 8
                        dtypes.setdefault(t, str(x.dtype))
                rows, cols = fh.get_tensor(f"{m}.weight_shape").tolist()
                n_w += rows * cols
    if not mods or n_w == 0:
        raise RuntimeError(f"no packed weights found in {out} (format {qc.get('format')!r})")
    if any("lm_head" in m for m in mods):
        raise RuntimeError("lm_head was quantized although it is ignored")
    return {
        "bits_per_weight": n_b / n_w, "quantized_modules": len(mods), "quantized_weights": n_w,
        "bits_note": (f"compressed checkpoint (save_compressed=True, format {qc.get('format')!r}): bytes of "
                      f"weight_packed + weight_scale + weight_zero_point tensors present (dtypes {dtypes}) of "
                      "the quantized Linear modules in the safetensors on disk, divided by their weights "
                      "(from weight_shape)"),
        "quantization_config": qc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--group", type=int, default=None)
    ap.add_argument("--sparsity-spec", help="pruning peers: a fraction (0.5) or N:M (2:4)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--asym", action="store_true",
                    help="llm-compressor and AutoRound only: asymmetric grid (zero points)")
    ap.add_argument("--iters", type=int, help="AutoRound, smoke tests only: override the preset's iterations")
    ap.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                    help="AutoRound: torch.compile of its tuning (auto: AutoRound's own default)")
    ap.add_argument("--work", help="scratch directory (llm-compressor's / AutoRound's saved checkpoint); "
                                   "default: a temp dir")
    ap.add_argument("--rescore-saved", action="store_true",
                    help="llm-compressor, AutoRound: also reload the saved checkpoint and score it "
                         "(AutoRound's auto_round checkpoint reloads in float16 through its torch backend)")
    args = ap.parse_args()
    if args.asym and args.method not in ASYM_METHODS:
        ap.error("--asym applies to " + ", ".join(ASYM_METHODS) + " only (HQQ is asymmetric already, NF4 has no "
                 "zero points)")
    if (args.iters is not None or args.torch_compile != "auto") and args.method not in AUTOROUND:
        ap.error("--iters and --torch-compile apply to AutoRound only")
    if (args.method in PRUNERS) != (args.sparsity_spec is not None):
        ap.error("--sparsity-spec is for (and required by) the pruning methods " + ", ".join(PRUNERS))
    if args.method not in PRUNERS and (args.bits is None or args.group is None):
        ap.error("--bits and --group are required for the quantizers")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.method in AUTOROUND:  # every input is local: make any download attempt fail instead
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    row: dict = {"method": args.method, "bits": args.bits, "group_size": args.group, "asym_requested": args.asym,
                 "model": args.model, "threads": args.threads,
                 "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                              "transformers": version("transformers")}}
    pkg = PEER_PACKAGE[args.method]
    if pkg:
        row["versions"][pkg] = version(pkg)
    if args.method.startswith("llmc"):
        row["versions"]["compressed-tensors"] = version("compressed-tensors")
    status = 0
    try:
        calib = load_file(args.calib)["ids"].to(torch.int64)
        windows = load_file(args.eval)["windows"].to(torch.int64)
        model = load_model(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            after_eval = None
            if args.method == "none":
                lin = decoder_linears(model)
                res = {"quantize_seconds": 0.0, "peak_rss_bytes": rss_bytes(), "bits_per_weight": 32.0,
                       "symmetric": None, "quantized_modules": 0,
                       "bits_note": f"unquantized: {len(lin)} decoder Linears as float32 weights",
                       "notes": ["protocol-parity check: the float32 model as loaded by transformers"]}
            elif args.method == "hqq":
                res = run_hqq(model, args.bits, args.group, calib)
            elif args.method == "bnb-nf4":
                res = run_bnb(model, args.bits, args.group, calib)
            elif args.method in PRUNERS:
                res = run_llmc_prune(model, args.sparsity_spec, calib, wanda=args.method == "llmc-wanda")
            elif args.method in AUTOROUND:
                res, after_eval, model = run_autoround(
                    model, args.bits, args.group, calib, preset=AUTOROUND[args.method], symmetric=not args.asym,
                    work=work, model_dir=args.model, iters=args.iters,
                    torch_compile={"auto": None, "on": True, "off": False}[args.torch_compile])
            else:
                res, after_eval = run_llmc(model, args.bits, args.group, calib,
                                           awq=args.method == "llmc-awq", work=work, symmetric=not args.asym)
            row.update(res)
            row["quantize_seconds"] = round(row["quantize_seconds"], 2)
            model.eval()  # replaced modules start in training mode
            t0 = time.perf_counter()
            ppl, count = perplexity(model, windows)
            row.update({"perplexity": ppl, "n_windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1]),
                        "predicted_tokens": count, "eval_seconds": round(time.perf_counter() - t0, 2),
                        "calibration_windows": list(calib.shape)})
            if not math.isfinite(ppl):
                raise FloatingPointError(f"perplexity is not finite: {ppl}")
            if after_eval is not None:
                row.update(after_eval())
                if args.rescore_saved and args.method in AUTOROUND:
                    # a diagnostic only: auto-round's loader may want its optional kernels (auto-round-lib,
                    # e.g. for int4 asymmetric GPTQ-packed layers on CPU) and then calls exit()
                    del model
                    try:
                        reloaded = load_model(str(work / "autoround"))
                        row["perplexity_reloaded"] = perplexity(reloaded, windows)[0]
                        row["reloaded_dtype"] = str(reloaded.dtype)
                    except (Exception, SystemExit) as e:
                        row["perplexity_reloaded_error"] = f"{type(e).__name__}: {e}"
                elif args.rescore_saved:
                    del model
                    row["perplexity_reloaded"] = perplexity(load_model(str(work / "llmc-compressed")), windows)[0]
    except (Exception, SystemExit) as e:  # recorded in the JSON, non-zero exit (auto-round calls exit())
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-4000:]
        status = 1
    row["peak_rss_bytes_end"] = rss_bytes()
    Path(args.out).write_text(json.dumps(row, indent=1, default=str) + "\n")
    print(json.dumps({k: row.get(k) for k in ("method", "bits", "group_size", "perplexity", "bits_per_weight",
                                               "quantize_seconds", "error")}))
    sys.exit(status)


if __name__ == "__main__":
    main()
