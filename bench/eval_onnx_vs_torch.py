"""The ONNX Runtime backend against the torch backend on the same fp32 model; writes bench/results/eval_onnx_vs_torch.json.

The fp32 reference model is exported with our ONNX exporter (the fused
graph) to a temporary directory, and both backends
score the wikitext2 protocol (64 x 1024 tokens) through the same task code.
The issue asks for the same perplexity within 0.1 %; the per-window NLLs are
compared too.

    .venv/bin/python bench/eval_onnx_vs_torch.py [--windows 64] [--threads 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="model directory (default: the reference model)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval_onnx_vs_torch.json"))
    args = ap.parse_args()

    import torch

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from compress.runner import run_tasks
    from eval.backends import TorchBackend
    from eval.onnx_backend import OrtBackend
    from export.onnx import export_onnx

    torch.set_num_threads(args.threads)
    opts = {"windows": args.windows}
    lm = load_model(args.model)
    t = time.perf_counter()
    ours = run_tasks(TorchBackend(lm.model, lm.tokenizer), ["wikitext2"], options=opts)["wikitext2"]
    torch_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        t = time.perf_counter()
        onnx_dir = export_onnx(lm, Path(tmp) / "onnx", threads=args.threads)
        export_s = time.perf_counter() - t
        del lm
        t = time.perf_counter()
        ort = run_tasks(OrtBackend(onnx_dir, threads=args.threads), ["wikitext2"], options=opts)["wikitext2"]
        ort_s = time.perf_counter() - t
    rel = abs(ort["perplexity"] - ours["perplexity"]) / ours["perplexity"]
    win = max(abs(a["nll"] - b["nll"]) / b["nll"] for a, b in zip(ort["items"], ours["items"], strict=True))
    res = {"command": " ".join(["python", *sys.argv]), "windows": ours["windows"],
           "torch_perplexity": ours["perplexity"], "onnxruntime_perplexity": ort["perplexity"],
           "relative_difference": rel, "target_relative_difference": 1e-3,
           "max_window_nll_relative_difference": win,
           "torch_seconds": round(torch_s, 1), "onnxruntime_seconds": round(ort_s, 1),
           "export_seconds": round(export_s, 1), "versions": package_versions()}
    print(f"torch {ours['perplexity']:.6f}  onnxruntime {ort['perplexity']:.6f}  relative difference {rel:.2e} "
          f"(largest per-window {win:.2e}); torch {torch_s:.0f} s, onnxruntime {ort_s:.0f} s")
    write_json_atomic(Path(args.output), res)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
