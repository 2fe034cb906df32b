"""Print the rows of one or more bench/quantize_reference.py result files as one Markdown table.

    .venv/bin/python bench/quantize_table.py bench/results/quantize_acceptance.json bench/results/quantize_matrix.json

Rows are grouped by (bits, group size, symmetry) in the order of the issue-3 matrix; each row names
the file (run) it comes from, so rows of different runs are never mistaken for one run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = {"awq+gptq": 0, "gptq": 1, "awq": 2, "rtn": 3}


def label(r: dict) -> str:
    g = "per-channel" if r["group_size"] == -1 else f"g{r['group_size']}"
    return f"W{r['bits']} {g}{'' if r.get('symmetric', True) else ' asym'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    rows = []
    for f in args.files:
        for r in json.loads(f.read_text())["results"]:
            if "error" not in r:
                rows.append({**r, "file": f.name})
    rows.sort(key=lambda r: (-r["bits"], r["group_size"] if r["group_size"] > 0 else 10**6,
                             r.get("symmetric", True), "tool" in r, ORDER.get(r["method"], 9)))
    print("| config | method (tool) | perplexity | rise | bits/weight on disk | time | peak RSS | run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tool = f"{r['method']} ({r['tool']})" if "tool" in r else r["method"]
        print(f"| {label(r)} | {tool} | {r['perplexity']:.3f} | {100 * r['rise_over_fp32']:+.1f} % | "
              f"{r['bits_per_weight_on_disk']:.3f} | {r['quantize_seconds']:.0f} s | "
              f"{r['peak_rss_bytes_during_quantize'] / 2**30:.2f} GiB | {r['file']} |")


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
