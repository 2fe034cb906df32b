"""Rotations before quantizing (`compress quantize --rotate`) on the reference model, beside the same recipe
without them: WikiText-2 perplexity (DESIGN.md protocol, --windows), wall time of the quantize command.

    .venv/bin/python bench/rotate.py [--windows 64] [--work DIR] [--rows NAME ...] [--note TEXT]

With --work, artifacts and scores already there are reused (a killed run resumes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import runs  # bench/runs.py (this script's directory is on sys.path)
from runs import ROOT

ROWS = {  # name -> compress quantize arguments (each also run with --rotate)
    "rtn W4 g128 sym": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "rtn W3 g64 asym": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--asym"],
    "awq+gptq W4 g128 sym (default)": ["--bits", "4", "--group-size", "128"],
    "awq+gptq W3 g64 asym": ["--bits", "3", "--group-size", "64", "--asym"],
}


ABLATION = {  # rotate settings -> what they isolate (RTN W4 g128 after each, on --ablation-windows windows)
    "none": None,
    "norms folded, no rotation": {"residual": True, "values": False, "fold_only": True},
    "R2 (values) only, no fold": {"residual": False, "values": True},
    "R1 (residual) only": {"residual": True, "values": False},
    "R1 + R2 (the default)": {"residual": True, "values": True},
}


def ablation(windows: int) -> dict[str, float]:
    """Which part of the rotation costs what, in process: RTN W4 g128 after each setting."""
    import copy
    from unittest import mock

    import torch

    from compress.models import load_model
    from compress.pipeline import apply
    from compress.plugins import load_plugins
    from compress.quantize import rotate
    from compress.recipe import Recipe
    from eval.backends import TorchBackend
    from eval.perplexity import PerplexityConfig, wikitext2

    load_plugins()
    lm = load_model(None)
    out = {}
    for name, rot in ABLATION.items():
        m = copy.deepcopy(lm.model)
        fold_only = rot is not None and rot.pop("fold_only", False)
        steps = [{"pass": "rotate", **rot}] if rot is not None else []
        # folding alone: the residual "rotation" by the identity matrix
        eye = (lambda n, g: torch.eye(n, dtype=torch.float64)) if fold_only else rotate.orthogonal
        with mock.patch.object(rotate, "orthogonal", eye):
            apply(m, Recipe.from_steps([*steps, {"pass": "rtn", "bits": 4, "group_size": 128}]), None)
        out[name] = wikitext2(TorchBackend(m, lm.tokenizer), PerplexityConfig(windows=windows))["perplexity"]
        print("ablation", name, round(out[name], 4), flush=True)
    return out


def main() -> None:
    ap = runs.parser(__doc__, "rotate.json")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="row names (default: all)")
    ap.add_argument("--ablation-windows", type=int, default=0,
                    help="also run the ablation (norm folding, R1, R2 apart) on this many windows")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from compress.artifact import package_versions, write_json_atomic

    work = runs.work_dir(args, "bench-rotate-")
    cli = runs.compress_cli()
    rows: dict[str, dict] = {}
    for name in args.rows:
        for rotated in (False, True):
            label = f"{name}{' + rotate' if rotated else ''}"
            slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
            art, scored = work / slug, work / f"{slug}.json"
            seconds = None
            if not art.exists():
                t0 = time.perf_counter()
                subprocess.run([*cli, "quantize", *ROWS[name], *(["--rotate"] if rotated else []), "--out",
                                str(art)], check=True, stdout=subprocess.DEVNULL)
                seconds = round(time.perf_counter() - t0, 1)
            r = runs.wikitext2(art, scored, args)
            rows[label] = {"perplexity": r["value"], "ci95": r["ci95"], "quantize_seconds": seconds,
                           "arguments": ROWS[name] + (["--rotate"] if rotated else [])}
            print(label, json.dumps(rows[label]), flush=True)
    abl = ablation(args.ablation_windows) if args.ablation_windows else None
    doc = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "ablation": abl,
           "ablation_protocol": {"windows": args.ablation_windows, "quantizer": "rtn W4 g128 sym"} if abl else None,
           "protocol": runs.protocol(args.windows),
           "fp32_reference": 24.9150, "machine_note": args.note, "versions": package_versions(), "results": rows}
    write_json_atomic(Path(args.output), doc)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
