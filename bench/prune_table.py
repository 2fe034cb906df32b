"""Print the rows of a bench/prune_reference.py result file as a Markdown table.

    .venv/bin/python bench/prune_table.py bench/results/prune_reference.json
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: prune_table.py RESULT.json")
    with open(sys.argv[1]) as f:
        d = json.load(f)
    rows = d["results"]
    fp32 = next((x["fp32_model_bytes"] for x in rows if x.get("fp32_model_bytes")), None)  # the dense checkpoint
    print("| config | tool | perplexity | rise over dense | pruning time | peak RSS (x fp32 file) | sparsity (layer min-max) | parameters | forward 1x512: this / dense (median ratio) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | | failed: {r['error'][:80]} | | | | | | |")
            continue
        tool = r.get("tool", "compress")
        rss = r.get("peak_rss_bytes_during_prune")
        rss_s = f"{rss / 2**30:.2f} GiB ({rss / fp32:.2f}x)" if rss and fp32 else ""
        sp = f"{r['sparsity']:.4f} ({r['layer_sparsity_min']:.4f}-{r['layer_sparsity_max']:.4f})" if r.get("sparsity") else ""
        params = f"{r['parameters'] / 1e6:.2f} M" if r.get("parameters") else ""
        fwd = ""
        if r.get("forward_seconds_1x512"):
            dense_s = r.get("dense_forward_seconds_1x512", r["forward_seconds_1x512"])  # taken in turns, same process
            fwd = f"{r['forward_seconds_1x512']:.3f} / {dense_s:.3f} s ({r['forward_time_ratio']:.3f}x)"
        rise = f"{100 * r['rise_over_dense']:+.1f} %" if "rise_over_dense" in r else ""
        print(f"| {r['config']} | {tool} | {r['perplexity']:.3f} | {rise} | {r.get('prune_seconds', 0):.0f} s | {rss_s} | {sp} | {params} | {fwd} |")


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
