"""Perplexity of our ONNX (MatMulNBits) artifacts against the same quantized model in torch; writes
bench/results/onnx_export_eval.json.

For each artifact (by default RTN W4 g128 and W8 per-channel of the reference
model, made here; the method does not matter for an exporter check) the
artifact is exported with `compress export --format onnx` (defaults: the
fused graph for this Llama model, accuracy level 0 = float activations) and
both are scored on the wikitext2 protocol. The issue asks for the int4 ONNX
artifact within 0.5 % of torch.

    .venv/bin/python bench/onnx_export_eval.py [--windows 64] [--int8-windows 16] [--threads 2] [--work DIR]

With --work, artifacts, exports and scores already there are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--int8-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="keep artifacts here (default: a temporary directory)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "onnx_export_eval.json"))
    args = ap.parse_args()

    from compress.artifact import package_versions, write_json_atomic
    from eval.onnx_backend import onnx_files

    tmp = tempfile.TemporaryDirectory(prefix="onnx-export-eval-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cli = str(Path(sys.executable).parent / "compress")
    configs = {"int4 g128": (["--bits", "4", "--group-size", "128"], args.windows),
               "int8 per-channel": (["--bits", "8", "--group-size", "-1"], args.int8_windows)}
    out: dict = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "results": {},
                 "versions": package_versions()}
    for i, (name, (qargs, windows)) in enumerate(configs.items()):
        art, onnx_dir = work / f"a{i}", work / f"a{i}-onnx"
        if not art.exists():
            subprocess.run([cli, "quantize", "--method", "rtn", *qargs, "--out", str(art)], check=True,
                           stdout=subprocess.DEVNULL)
        if not onnx_dir.exists():
            subprocess.run([cli, "export", str(art), "--format", "onnx", "--out", str(onnx_dir),
                            "--threads", str(args.threads)], check=True, stdout=subprocess.DEVNULL)
        assert onnx_files(onnx_dir) is not None
        ppl = {}
        for kind, path in (("torch", art), ("onnxruntime", onnx_dir)):
            res = work / f"a{i}-{kind}.json"
            if res.exists():  # --work: a score of the same files, kept from an earlier run
                r = json.loads(res.read_text())["results"]["wikitext2"]
                ppl[kind] = {"perplexity": r["perplexity"], "seconds": r["seconds"], "backend": r["backend"]}
                continue
            subprocess.run([cli, "eval", str(path), "--task", "wikitext2", "--windows", str(windows), "--threads",
                            str(args.threads), "--output", str(res)], check=True, stdout=subprocess.DEVNULL)
            r = json.loads(res.read_text())["results"]["wikitext2"]
            ppl[kind] = {"perplexity": r["perplexity"], "seconds": r["seconds"], "backend": r["backend"]}
        prov = json.loads((onnx_dir / "compress.json").read_text())["format_exported"]
        rel = (ppl["onnxruntime"]["perplexity"] - ppl["torch"]["perplexity"]) / ppl["torch"]["perplexity"]
        out["results"][name] = {"windows": windows, **{k: v for k, v in ppl.items()}, "relative_difference": rel,
                                "matmulnbits": prov["matmulnbits_by_bits"],
                                "accuracy_level": prov["accuracy_level"], "graph": prov.get("graph", "optimum"),
                                "verify_max_abs_logit_diff": prov["verify_max_abs_logit_diff"],
                                "onnx_bytes": sum(f.stat().st_size for f in onnx_dir.glob("model.onnx*"))}
        print(f"{name}: torch {ppl['torch']['perplexity']:.4f}, onnxruntime {ppl['onnxruntime']['perplexity']:.4f} "
              f"({100 * rel:+.3f} %), {windows} windows", flush=True)
        write_json_atomic(Path(args.output), out)
    tmp.cleanup()


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
