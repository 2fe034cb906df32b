"""Block reconstruction (`block_tune`) on the reference model beside the recipes it starts from: WikiText-2
perplexity (DESIGN.md protocol, --windows), bits per weight, wall time and peak RSS of `compress run`.

    .venv/bin/python bench/block_tune.py [--rows NAME ...] [--windows 64] [--work DIR] [--note TEXT]

Each row is a recipe run by `compress run` in its own process (peak RSS from /usr/bin/time); with --work,
artifacts and scores already there are reused (a killed run resumes; a reused row has no new timing).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import runs  # bench/runs.py (this script's directory is on sys.path)
from runs import ROOT


def _grid(bits: int, group: int, symmetric: bool) -> dict:
    return {"bits": bits, "group_size": group, "symmetric": symmetric}


W4G128 = _grid(4, 128, True)
W4G64A = _grid(4, 64, False)
W3G64A = _grid(3, 64, False)
W2G64A = _grid(2, 64, False)
W2G32A = _grid(2, 32, False)


def _awq_then(step: dict, grid: dict) -> list[dict]:
    return [{"pass": "awq", "quantize": False, **grid}, {**step, **grid}]


ROWS: dict[str, list[dict]] = {}
for label, grid in (("W4 g128 sym", W4G128), ("W4 g64 asym", W4G64A), ("W3 g64 asym", W3G64A),
                    ("W2 g64 asym", W2G64A), ("W2 g32 asym", W2G32A)):
    ROWS[f"rtn {label}"] = [{"pass": "rtn", **grid}]
    ROWS[f"awq+gptq {label}"] = _awq_then({"pass": "gptq"}, grid)
    for iters in (50, 200):
        ROWS[f"block_tune rtn-init {iters} {label}"] = [{"pass": "block_tune", "init": "rtn", "iters": iters, **grid}]
        ROWS[f"block_tune gptq-init {iters} {label}"] = [{"pass": "block_tune", "iters": iters, **grid}]
        ROWS[f"awq+block_tune {iters} {label}"] = _awq_then({"pass": "block_tune", "iters": iters}, grid)
        ROWS[f"awq+block_tune rtn-init {iters} {label}"] = _awq_then(
            {"pass": "block_tune", "init": "rtn", "iters": iters}, grid)


def quantize(steps: list[dict], art: Path, recipe: Path) -> dict:
    """Run the recipe with `compress run` into `art`; wall seconds, peak RSS and the run's reports."""
    import yaml

    recipe.write_text(yaml.safe_dump(steps, sort_keys=False))
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib=%M", *runs.compress_cli(), "run", str(recipe),
                        "--out", str(art)], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rss = next(int(x.split("=")[1]) for x in p.stderr.splitlines() if x.startswith("maxrss_kib="))
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    return {"quantize_seconds": round(seconds, 1), "peak_rss_bytes": rss * 1024,
            "reports": {r["name"]: r["metrics"] for r in summary.get("reports", [])}, "bytes": summary.get("bytes")}


def main() -> None:
    ap = runs.parser(__doc__, "block_tune.json")
    ap.add_argument("--rows", nargs="*", default=None, help=f"row names (default: all); known: {', '.join(ROWS)}")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from compress.artifact import package_versions, write_json_atomic

    work = runs.work_dir(args, "bench-block-tune-")
    out = Path(args.output)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    rows: dict[str, dict] = doc.get("results", {})
    for name in args.rows or list(ROWS):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}")
        slug = name.replace(" ", "_").replace("+", "plus")
        art, scored = work / slug, work / f"{slug}.json"
        run = json.loads((work / f"{slug}.run.json").read_text()) if (work / f"{slug}.run.json").is_file() else None
        if run is None or not art.exists():
            run = quantize(ROWS[name], art, work / f"{slug}.yaml")
            (work / f"{slug}.run.json").write_text(json.dumps(run))
        r = runs.wikitext2(art, scored, args)
        bits = next((m["bits_per_weight"] for m in run["reports"].values() if "bits_per_weight" in m), None)
        rows[name] = {"perplexity": r["value"], "ci95": r["ci95"], "bits_per_weight": bits, **run,
                      "recipe": ROWS[name]}
        print(name, json.dumps({k: rows[name][k] for k in ("perplexity", "quantize_seconds", "peak_rss_bytes")}),
              flush=True)
        doc = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
               "protocol": runs.protocol(args.windows), "fp32_reference": 24.9150,
               "calibration": "wikitext2 validation, 128 x 512 tokens, seed 0 (compress run's default)",
               "machine_note": args.note, "versions": package_versions(), "results": rows}
        write_json_atomic(out, doc)  # after every row: a killed run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
