"""Embedding quantization on the reference model: artifact, ONNX and GGUF sizes, perplexity cost, export memory.

The default W4 artifact (AWQ + GPTQ, g128) is made once; `quantize_embeddings` at 8 and 4 bits is then applied
to it (`compress run`), so the three artifacts share every Linear's codes and differ only in the embedding (and
the output layer tied to it). Each is scored in torch (wikitext2, the DESIGN.md protocol with --windows) and
exported to ONNX and GGUF; every export runs in its own process, whose peak RSS is recorded. With `--before
DIR` (a checkout of the code before the change, e.g. `git worktree add /tmp/wt-before <rev>`) the float-embedding
artifact is also exported by that code, for the "before" memory row.

The reference model's source GGUF stores its embedding as Q8_0 (its Linears as Q4_1), and `--embeddings int8` is
Q8_0's grid: the int8 row reproduces the float-embedding artifact's numbers exactly (difference 0, the same
perplexity); it shows the size, not a quality cost. The int4 row is a real rounding.

    .venv/bin/python bench/embeddings.py [--windows 64] [--work DIR] [--before DIR] [--note TEXT]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import runs  # bench/runs.py (this script's directory is on sys.path)
from runs import ROOT

# runs the CLI in-process and prints this process's peak RSS (bytes) as the last line of stdout
MEASURED = ("import resource, sys\n"
            "from compress.cli import cli\n"
            "try:\n    cli.main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")


def run_measured(args: list[str], code_root: Path = ROOT) -> int:
    """Run `compress ARGS` in a fresh process on the code at `code_root`; its peak RSS in bytes."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    out = subprocess.run([sys.executable, "-c", MEASURED, *args], check=True, capture_output=True, text=True,
                         env=env, cwd=code_root)
    return int(out.stdout.strip().splitlines()[-1])


def embedding_diff(base: Path, art: Path) -> float:
    """Largest |difference| between the two artifacts' embedding matrices (0: the same numbers)."""
    import torch

    from compress.models import load_model

    def matrix(path: Path) -> torch.Tensor:
        emb = load_model(path).model.get_input_embeddings()
        return emb.dequantize_weight() if hasattr(emb, "dequantize_weight") else emb.weight.detach().float()

    return float((matrix(base) - matrix(art)).abs().max())


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".onnx",
                                                                                          ".onnx_data", ".gguf"))


def main() -> None:
    ap = runs.parser(__doc__, "embeddings.json")
    ap.add_argument("--before", help="a checkout of the code before the change: its ONNX export's peak RSS")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from compress.artifact import package_versions, write_json_atomic

    work = runs.work_dir(args, "bench-embeddings-")
    cli = runs.compress_cli()
    base = work / "w4-default"
    if not base.exists():
        subprocess.run([*cli, "quantize", "--bits", "4", "--group-size", "128", "--out", str(base)], check=True,
                       stdout=subprocess.DEVNULL)
    rows: dict[str, dict] = {}
    for emb in ("float", "int8", "int4"):
        art = base if emb == "float" else work / f"w4-default-emb-{emb}"
        if not art.exists():
            recipe = work / f"emb-{emb}.yaml"
            recipe.write_text(f"- pass: quantize_embeddings\n  bits: {emb[3:]}\n")
            subprocess.run([*cli, "run", str(recipe), str(base), "--out", str(art)], check=True,
                           stdout=subprocess.DEVNULL)
        row: dict = {"artifact_bytes": size(art), "embedding_max_abs_diff_vs_float": embedding_diff(base, art)}
        row["perplexity"] = runs.wikitext2(art, work / f"eval-{emb}.json", args)["value"]
        for fmt in ("onnx", "gguf"):
            out = work / f"{art.name}-{fmt}"
            rss = run_measured(["export", str(art), "--format", fmt, "--out", str(out), "--force"])
            row[f"{fmt}_bytes"], row[f"{fmt}_export_peak_rss_bytes"] = size(out), rss
        if args.before and emb == "float":
            out = work / f"{art.name}-onnx-before"
            row["onnx_export_peak_rss_bytes_before"] = run_measured(
                ["export", str(art), "--format", "onnx", "--out", str(out), "--force"], Path(args.before))
            row["onnx_bytes_before"] = size(out)
        rows[emb] = row
        print(emb, json.dumps(row), flush=True)
    fp = rows["float"]["perplexity"]
    for row in rows.values():
        row["perplexity_vs_float_embedding"] = row["perplexity"] / fp - 1
        row["artifact_bytes_vs_float_embedding"] = row["artifact_bytes"] / rows["float"]["artifact_bytes"]
    doc = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
           "protocol": runs.protocol(args.windows),
           "model": "reference (SmolLM2-135M), default W4 (awq+gptq g128) for every Linear",
           "machine_note": args.note, "versions": package_versions(), "results": rows}
    write_json_atomic(Path(args.output), doc)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
