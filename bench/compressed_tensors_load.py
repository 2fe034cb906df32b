"""transformers + compressed-tensors load our artifacts of the reference model; writes
bench/results/compressed_tensors_load.json.

RTN W4 g128 (rows of 576 inputs stored as groups of 64) and W8 per-channel,
symmetric, are loaded with `AutoModelForCausalLM.from_pretrained` (the
compressed-tensors quantizer decompresses them) and with our loader; the issue
asks for logits within 1e-3 (max abs, fp32) on 3 prompts.

    .venv/bin/python bench/compressed_tensors_load.py [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ("The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein published")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="artifact directory (default: a temporary directory)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "compressed_tensors_load.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model

    tmp = tempfile.TemporaryDirectory(prefix="ct-load-")
    work = Path(args.work or tmp.name)
    cli = str(Path(sys.executable).parent / "compress")
    res: dict = {"command": " ".join(["python", *sys.argv]), "prompts": list(PROMPTS), "results": {},
                 "versions": package_versions()}
    for name, qargs in (("w4", ["--bits", "4", "--group-size", "128"]), ("w8", ["--bits", "8", "--group-size", "-1"])):
        path = work / name
        if not path.exists():
            subprocess.run([cli, "quantize", "--method", "rtn", *qargs, "--out", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
        ours = load_model(path)
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        worst = 0.0
        for text in PROMPTS:
            ids = ours.tokenizer(text, return_tensors="pt").input_ids
            with torch.inference_mode():
                worst = max(worst, float((ours.model(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max()))
        res["results"][name] = {"args": qargs, "max_abs_logit_difference": worst, "target": 1e-3}
        print(f"{name}: max |logit difference| {worst:.3g}", flush=True)
    write_json_atomic(Path(args.output), res)
    tmp.cleanup()


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
