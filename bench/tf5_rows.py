"""The main result rows re-run under the installed transformers (5.x), beside the numbers recorded under 4.57.

Rows: fp32; RTN W4 g128 and the default W4 (AWQ+GPTQ g128) scored in torch; the RTN W4 g128 artifact as an
ONNX int4 (MatMulNBits) graph in ONNX Runtime; RTN W4 g32 and the default W4 as GGUF Q4_0 in llama.cpp. Each
row is scored under the DESIGN.md protocol through the CLI and printed next to the value the 4.57 runs
recorded (read from the result files named in `RECORDED`), with the relative difference.

    .venv/bin/python bench/tf5_rows.py [--threads 2] [--windows 64] [--work DIR]

With --work, artifacts and scores already there are reused (a killed run resumes). Needs `make llama-setup`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# row -> (quantize arguments or None for the float model, exporter or None, eval backend)
ROWS = {
    "fp32": (None, None, "torch"),
    "rtn-w4-g128": (["--method", "rtn", "--bits", "4", "--group-size", "128"], None, "torch"),
    "awq+gptq-w4-g128 (default)": (["--bits", "4", "--group-size", "128"], None, "torch"),
    "onnx int4 (rtn-w4-g128)": (["--method", "rtn", "--bits", "4", "--group-size", "128"], "onnx", "onnxruntime"),
    "gguf Q4_0 (rtn-w4-g32)": (["--method", "rtn", "--bits", "4", "--group-size", "32"], "gguf", "llama.cpp"),
    "gguf Q4_0 (awq+gptq-w4-g128)": (["--bits", "4", "--group-size", "128"], "gguf", "llama.cpp"),
}


def recorded() -> dict[str, tuple[float, str]]:
    """row -> (perplexity recorded under transformers 4.57, where)."""
    rtn = json.loads((RESULTS / "rtn_reference.json").read_text())
    onnx = json.loads((RESULTS / "onnx_export_eval.json").read_text())
    gguf = json.loads((RESULTS / "gguf_reference.json").read_text())
    out = {
        "fp32": (rtn["results"]["fp32"]["perplexity"], "rtn_reference.json results.fp32"),
        "onnx int4 (rtn-w4-g128)": (onnx["results"]["int4 g128"]["onnxruntime"]["perplexity"],
                                    "onnx_export_eval.json results['int4 g128'].onnxruntime"),
        "gguf Q4_0 (rtn-w4-g32)": (gguf["results"]["rtn-w4-g32"]["llama.cpp"]["perplexity"],
                                   "gguf_reference.json results['rtn-w4-g32']['llama.cpp']"),
        "gguf Q4_0 (awq+gptq-w4-g128)": (gguf["results"]["awq+gptq-w4-g128"]["llama.cpp"]["perplexity"],
                                         "gguf_reference.json results['awq+gptq-w4-g128']['llama.cpp']"),
        "awq+gptq-w4-g128 (default)": (gguf["results"]["awq+gptq-w4-g128"]["torch"]["perplexity"],
                                       "gguf_reference.json results['awq+gptq-w4-g128'].torch"),
    }
    out["rtn-w4-g128"] = (onnx["results"]["int4 g128"]["torch"]["perplexity"],
                          "onnx_export_eval.json results['int4 g128'].torch")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--work", help="keep artifacts here (default: a temporary directory)")
    ap.add_argument("--output", default=str(RESULTS / "tf5_rows.json"))
    ap.add_argument("--note", default="", help="what else ran on the machine")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from compress.artifact import package_versions, write_json_atomic

    tmp = tempfile.TemporaryDirectory(prefix="tf5-rows-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cli = [str(Path(sys.executable).parent / "compress")]
    before = recorded()
    rows: dict[str, dict] = {}
    for name, (qargs, exporter, backend) in ROWS.items():
        model: Path | None = None
        if qargs is not None:
            model = work / "-".join(qargs).replace("--", "").replace("+", "")
            if not model.exists():
                subprocess.run([*cli, "quantize", *qargs, "--out", str(model)], check=True, stdout=subprocess.DEVNULL)
        if exporter is not None:
            src, model = model, work / f"{model.name}-{exporter}"
            if not model.exists():
                subprocess.run([*cli, "export", str(src), "--format", exporter, "--out", str(model)], check=True,
                               stdout=subprocess.DEVNULL)
        scored = work / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.json"
        if not scored.exists():
            subprocess.run([*cli, "eval", *([str(model)] if model else []), "--backend", backend, "--threads",
                            str(args.threads), "--windows", str(args.windows), "--output", str(scored)],
                           check=True, stdout=subprocess.DEVNULL)
        r = json.loads(scored.read_text())["results"]["wikitext2"]
        row = {"perplexity": r["value"], "backend": backend, "seconds": round(r["seconds"], 1)}
        if name in before:
            old, where = before[name]
            row |= {"transformers_4_57": old, "recorded_in": where, "relative_difference": r["value"] / old - 1}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    doc = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
           "protocol": {"task": "wikitext2", "windows": args.windows, "seq_len": 1024, "prepend_bos": False},
           "machine_note": args.note, "versions": package_versions(), "results": rows}
    write_json_atomic(Path(args.output), doc)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
