"""Our perplexity against an independent computation; writes bench/results/eval_fidelity.json.

The independent computation is the plainest one there is: the same windows
(non-overlapping 1024-token windows of the WikiText-2 test file, tokenized as
one string without special tokens) through the Hugging Face model called with
`labels=`, whose mean loss times the predicted-token count is summed over
windows. The issue asks for agreement to 4 significant digits.

    .venv/bin/python bench/eval_fidelity.py [--windows 64] [--threads 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="model directory (default: the reference model)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval_fidelity.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from compress.reference import reference_model_dir
    from compress.runner import evaluate

    torch.set_num_threads(args.threads)
    ours = evaluate(load_model(args.model), ["wikitext2"], options={"windows": args.windows})["wikitext2"]

    # independent: transformers only, nothing of ours but the file path
    model_dir = Path(args.model) if args.model else reference_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = (ROOT / "compress" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    n = min(args.windows, ids.numel() // 1024)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(n):
            w = ids[i * 1024 : (i + 1) * 1024][None]
            loss = model(input_ids=w, labels=w, use_cache=False).loss  # mean over the 1023 predicted tokens
            total += float(loss) * 1023
            count += 1023
    hf = math.exp(total / count)
    rel = abs(ours["perplexity"] - hf) / hf
    res = {"command": " ".join(["python", *sys.argv]), "windows": n, "ours": ours["perplexity"],
           "hf_labels": hf, "relative_difference": rel,
           "same_to_4_significant_digits": f"{ours['perplexity']:.4g}" == f"{hf:.4g}",
           "protocol": ours["protocol"], "versions": package_versions()}
    print(f"ours {ours['perplexity']:.6f}  HF labels {hf:.6f}  relative difference {rel:.2e}")
    write_json_atomic(Path(args.output), res)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
