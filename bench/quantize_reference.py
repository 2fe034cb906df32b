"""Weight quantization methods on the reference model; writes bench/results/quantize_reference.json.

For each (method, bits, group size) it runs, in a fresh subprocess: load the
fp32 reference model, quantize (wall time, peak RSS of the process so far),
save the packed artifact, count bits per quantized weight from the tensors on
disk, reload the artifact and score it under the DESIGN.md perplexity protocol.
Calibration: 128 windows x 512 tokens of the WikiText-2 validation split, seed 0.

    .venv/bin/python bench/quantize_reference.py [--configs rtn:4:128,gptq:4:128,...] [--windows 64]

Peers (llm-compressor, HQQ, bitsandbytes) are not run by this script yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = "rtn:4:128,gptq:4:128,rtn:4:64,gptq:4:64,gptq:3:64,gptq:8:-1,rtn:8:-1"


def one(method: str, bits: int, group: int, symmetric: bool, windows: int, threads: int) -> dict:
    import torch
    from safetensors import safe_open

    from calibrate.data import CalibConfig, load_calibration
    from compress.models import load_model, save_model
    from compress.pipeline import apply
    from compress.recipe import Recipe
    from compress.runner import evaluate

    torch.set_num_threads(threads)
    lm = load_model()
    recipe = Recipe.single(method, bits=bits, group_size=group, symmetric=symmetric)
    calib = load_calibration(lm.tokenizer, CalibConfig()) if recipe.steps[0].spec.needs_calibration else None
    t0 = time.perf_counter()
    reports = apply(lm.model, recipe, calib)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as d:
        out = save_model(lm, Path(d) / "a", recipe=recipe.to_list(), reports=reports)
        mods = json.loads((out / "compress.json").read_text())["quantization"]["modules"]
        n_w = sum(m["in_features"] * m["out_features"] for m in mods.values())
        n_b = 0
        with safe_open(out / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            for name in mods:
                for t in ("weight_packed", "weight_scale", "weight_zero_point"):
                    if f"{name}.{t}" in keys:
                        x = f.get_tensor(f"{name}.{t}")
                        n_b += x.numel() * x.element_size() * 8
        del lm
        r = evaluate(load_model(out), ["wikitext2"], options={"windows": windows})["wikitext2"]
    return {"method": method, "bits": bits, "group_size": group, "symmetric": symmetric,
            "perplexity": r["perplexity"], "bits_per_weight_on_disk": n_b / n_w,
            "quantize_seconds": round(seconds, 1), "peak_rss_bytes_during_quantize": rss,
            "protocol": r["protocol"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT, help="method:bits:group[:asym],... (symmetric unless :asym)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "quantize_reference.json"))
    args = ap.parse_args()
    if args.one:
        m, b, g, *sym = args.one.split(":")
        if sym not in ([], ["sym"], ["asym"]):
            raise SystemExit(f"bad config {args.one!r}: method:bits:group[:sym|asym]")
        print(json.dumps(one(m, int(b), int(g), sym != ["asym"], args.windows, args.threads)))
        return
    from compress.artifact import package_versions, write_json_atomic

    fp32 = json.loads((Path(__file__).parent / "results" / "rtn_reference.json").read_text())
    base = fp32["results"]["fp32"]["perplexity"]
    rows = []
    for cfg in args.configs.split(","):
        p = subprocess.run([sys.executable, __file__, "--one", cfg, "--windows", str(args.windows),
                            "--threads", str(args.threads)], capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{cfg} failed")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["rise_over_fp32"] = row["perplexity"] / base - 1
        rows.append(row)
        print(f"{cfg:12s} ppl {row['perplexity']:.3f} (+{100 * row['rise_over_fp32']:.1f} %) "
              f"{row['bits_per_weight_on_disk']:.3f} bpw  {row['quantize_seconds']:.0f} s  "
              f"{row['peak_rss_bytes_during_quantize'] / 2**30:.2f} GiB", flush=True)
    write_json_atomic(Path(args.output), {
        "command": " ".join(["python", *sys.argv]),
        "fp32_perplexity": base, "fp32_from": "bench/results/rtn_reference.json",
        "calibration": "wikitext2 validation, 128 x 512 tokens, seed 0",
        "threads": args.threads, "versions": package_versions(), "results": rows})


if __name__ == "__main__":
    main()
