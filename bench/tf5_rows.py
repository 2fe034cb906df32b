"""The main result rows re-run under the installed transformers (5.x), beside the numbers recorded under 4.57.

Rows: fp32; RTN W4 g128 and the default W4 (AWQ+GPTQ g128) scored in torch; the RTN W4 g128 artifact as an
ONNX int4 (MatMulNBits) graph in ONNX Runtime; RTN W4 g32 and the default W4 as GGUF Q4_0 in llama.cpp. Each
row is scored under the DESIGN.md protocol through the CLI and printed next to the value the 4.57 runs
recorded (read from the result files named in `RECORDED`), with the relative difference.

    .venv/bin/python bench/tf5_rows.py [--threads 2] [--windows 64] [--work DIR]

With --work, artifacts and scores already there are reused (a killed run resumes). Needs `make llama-setup`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import runs  # bench/runs.py (this script's directory is on sys.path)
from runs import RESULTS, ROOT

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
    args = runs.parser(__doc__, "tf5_rows.json").parse_args()
    sys.path.insert(0, str(ROOT))
    from compress.artifact import package_versions, write_json_atomic

    work = runs.work_dir(args, "tf5-rows-")
    cli = runs.compress_cli()
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
        r = runs.wikitext2(model, work / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}.json", args,
                           backend)
        row = {"perplexity": r["value"], "backend": backend, "seconds": round(r["seconds"], 1)}
        if name in before:
            old, where = before[name]
            row |= {"transformers_4_57": old, "recorded_in": where, "relative_difference": r["value"] / old - 1}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    doc = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
           "protocol": runs.protocol(args.windows),
           "machine_note": args.note, "versions": package_versions(), "results": rows}
    write_json_atomic(Path(args.output), doc)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
