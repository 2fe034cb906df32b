"""Fingerprints of what every calibrated pass produces, to prove a refactor left the numerics alone.

Each case runs a recipe and hashes (sha256) every tensor of the resulting
state dict, in name order, together with the pass reports' metrics (their
exact float values). Two commits with the same fingerprints compute the same
bits. Cases:

- `tiny`: random 2-block Llama and OPT models (hidden 64, built here from a
  config, no files), random calibration ids; every block-wise pass and the
  options that change its loop (true_sequential, act_order, bf16 forwards,
  N:M, search, fallback, scale tuning). In process, whole model in memory.
- `lora`: a random LoRA adapter merged into a GPTQ artifact of the tiny Llama, with and without the
  scale_tune step `compress merge-lora` adds.
- `reference`: the reference model through `compress_model` (weights streamed
  block by block from disk, as `compress quantize` runs it), 16 windows x 256
  tokens of the WikiText-2 validation split; the hash is over the artifact's
  safetensors files.

    .venv/bin/python bench/numerics_fingerprint.py [--part tiny|lora|reference|all] [--out FILE]

Compare two runs with `diff` (or `--against FILE`: prints the cases that differ, exit 1 if any).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY_CASES: dict[str, list[dict]] = {
    "gptq": [{"pass": "gptq", "bits": 4, "group_size": 32}],
    "gptq_not_sequential": [{"pass": "gptq", "bits": 3, "group_size": 32, "true_sequential": False}],
    "gptq_no_act_order_asym": [{"pass": "gptq", "bits": 4, "group_size": 32, "act_order": False, "symmetric": False}],
    "gptq_bf16": [{"pass": "gptq", "bits": 4, "group_size": 32, "forward_dtype": "bfloat16"}],
    # the scale_tune step's reference: the tiny model saved to a directory (the model the recipe started from)
    "gptq_tuned": [{"pass": "gptq", "bits": 4, "group_size": 32, "batch_size": 2},
                   {"pass": "scale_tune", "steps": 4, "reference": "{saved}"}],
    "awq": [{"pass": "awq", "bits": 4, "group_size": 32}],
    "awq_gptq": [{"pass": "awq", "bits": 4, "group_size": 32, "symmetric": False, "quantize": False},
                 {"pass": "gptq", "bits": 4, "group_size": 32, "symmetric": False}],
    "mixed": [{"pass": "mixed", "target_bits": 4.5, "group_size": 32}],
    "sparsegpt": [{"pass": "sparsegpt", "sparsity": 0.5}],
    "sparsegpt_2_4": [{"pass": "sparsegpt", "pattern": "2:4", "true_sequential": False}],
    "wanda": [{"pass": "wanda", "sparsity": 0.5}],
    "sparsegpt_then_gptq": [{"pass": "sparsegpt", "sparsity": 0.5}, {"pass": "gptq", "bits": 4, "group_size": 32}],
    "smoothquant_w8a8": [{"pass": "smoothquant", "alpha": 0.5}, {"pass": "w8a8"}],
    "smoothquant_search_w8a8_mse": [{"pass": "smoothquant", "search": True, "search_observer": "mse"},
                                    {"pass": "w8a8", "observer": "mse"}],
    "w8a8_fallback": [{"pass": "w8a8", "fallback_error": 1e-4}],
    "w8a8_dynamic": [{"pass": "w8a8", "activations": "dynamic"}],
    "prune_channels": [{"pass": "prune_channels", "ratio": 0.25}],
    "prune_heads": [{"pass": "prune_heads", "ratio": 0.5}],
    "prune_layers": [{"pass": "prune_layers", "ratio": 0.5}],
    "rtn": [{"pass": "rtn", "bits": 4, "group_size": 32}],
    "magnitude": [{"pass": "magnitude", "sparsity": 0.5}],
}
# the heads case needs head_dim/num_key_value_heads in the config: Llama only
LLAMA_ONLY = {"prune_heads"}

REFERENCE_CASES: dict[str, list[dict]] = {
    "gptq_w4g128": [{"pass": "gptq", "bits": 4, "group_size": 128}],
    "awq_gptq_w4g64_asym": [{"pass": "awq", "bits": 4, "group_size": 64, "symmetric": False, "quantize": False},
                            {"pass": "gptq", "bits": 4, "group_size": 64, "symmetric": False}],
    "w8a8_smoothquant": [{"pass": "smoothquant", "alpha": 0.5}, {"pass": "w8a8"}],
    "sparsegpt_50": [{"pass": "sparsegpt", "sparsity": 0.5}],
    "wanda_50": [{"pass": "wanda", "sparsity": 0.5}],
    "prune_channels_25": [{"pass": "prune_channels", "ratio": 0.25}],
}


def tiny_model(arch: str, vocab: int = 512):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True)
    else:
        config = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metrics_of(reports) -> list:
    return [sorted((k, v) for k, v in (r.metrics if hasattr(r, "metrics") else r["metrics"]).items()
                   if not k.endswith("seconds")) for r in reports]


def save_tiny(arch: str, where: Path, vocab: int = 512) -> str:
    """The tiny model saved as a model directory, with the reference model's tokenizer (never used, but every
    model directory needs one)."""
    import shutil

    from compress.models import TOKENIZER_FILES
    from compress.reference import reference_model_dir

    tiny_model(arch, vocab).save_pretrained(where)
    for name in TOKENIZER_FILES:
        if (reference_model_dir() / name).is_file():
            shutil.copy(reference_model_dir() / name, where / name)
    return str(where)


def run_tiny() -> dict:
    from compress.pipeline import apply
    from compress.plugins import load_plugins
    from compress.recipe import Recipe

    load_plugins()
    out = {}
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    tmp = tempfile.TemporaryDirectory()
    for arch in ("llama", "opt"):
        saved = save_tiny(arch, Path(tmp.name) / arch)
        for case, steps in TINY_CASES.items():
            if case in LLAMA_ONLY and arch != "llama":
                continue
            steps = [{k: saved if v == "{saved}" else v for k, v in s.items()} for s in steps]
            model = tiny_model(arch)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            reports = apply(model, Recipe.from_steps(steps, where=case), ids)
            out[f"tiny/{arch}/{case}"] = {"state": state_hash(model),
                                          "metrics": hashlib.sha256(repr(metrics_of(reports)).encode()).hexdigest(),
                                          "seconds": round(time.perf_counter() - t0, 2)}
            print(case, arch, out[f"tiny/{arch}/{case}"], flush=True)
    return out


def run_reference() -> dict:
    from calibrate.data import CalibConfig
    from compress.plugins import load_plugins
    from compress.recipe import Recipe
    from compress.runner import compress_model

    load_plugins()
    out = {}
    for case, steps in REFERENCE_CASES.items():
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            summary = compress_model(None, Recipe.from_steps(steps, where=case), Path(d) / "a",
                                     calib=CalibConfig(samples=16, seq_len=256))
            h = hashlib.sha256()
            for f in sorted((Path(d) / "a").glob("*.safetensors")):
                h.update(f.read_bytes())
            out[f"reference/{case}"] = {"state": h.hexdigest(),
                                        "metrics": hashlib.sha256(repr(metrics_of(summary["reports"])).encode())
                                        .hexdigest(), "seconds": round(time.perf_counter() - t0, 1)}
            print(case, out[f"reference/{case}"], flush=True)
    return out


def run_lora() -> dict:
    """A LoRA adapter (peft, random factors) merged into a GPTQ W4 artifact of the tiny Llama, without and with
    the scale tuning `compress merge-lora` adds, through `compress_model`."""
    from peft import LoraConfig, get_peft_model

    from calibrate.data import CalibConfig
    from compress.plugins import load_plugins
    from compress.recipe import Recipe
    from compress.runner import compress_model

    load_plugins()
    out = {}
    calib = CalibConfig(samples=32, seq_len=64)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        vocab = 49152  # the reference tokenizer's: calibration text is tokenized with it
        save_tiny("llama", root / "base", vocab)
        peft_model = get_peft_model(tiny_model("llama", vocab), LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=["q_proj", "v_proj", "down_proj"]))
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
        peft_model.save_pretrained(root / "adapter")
        compress_model(root / "base", Recipe.from_steps([{"pass": "gptq", "bits": 4, "group_size": 32}]), root / "q",
                       calib=calib)
        merge = {"pass": "lora_merge", "adapters": [str(root / "adapter")]}
        for case, steps in (("merge", [merge]), ("merge_tuned", [merge, {"pass": "scale_tune", "steps": 8}])):
            summary = compress_model(root / "q", Recipe.from_steps(steps), root / case, calib=calib)
            h = hashlib.sha256(b"".join(f.read_bytes() for f in sorted((root / case).glob("*.safetensors"))))
            out[f"lora/{case}"] = {"state": h.hexdigest(), "metrics": hashlib.sha256(repr(metrics_of(
                summary["reports"])).encode()).hexdigest()}
            print(case, out[f"lora/{case}"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("tiny", "lora", "reference", "all"), default="all")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--against", type=Path, help="an earlier run's JSON: report the cases that differ")
    args = ap.parse_args()
    torch.set_num_threads(2)
    got = {}
    if args.part in ("tiny", "all"):
        got.update(run_tiny())
    if args.part in ("lora", "all"):
        got.update(run_lora())
    if args.part in ("reference", "all"):
        got.update(run_reference())
    if args.out:
        args.out.write_text(json.dumps(got, indent=1) + "\n")
    if args.against:
        before = json.loads(args.against.read_text())
        differ = [k for k in got if k in before and
                  (got[k]["state"], got[k]["metrics"]) != (before[k]["state"], before[k]["metrics"])]
        missing = [k for k in got if k not in before]
        print(f"{len(got) - len(differ) - len(missing)} identical, {len(differ)} differ: {differ}, "
              f"{len(missing)} not in {args.against}: {missing}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
