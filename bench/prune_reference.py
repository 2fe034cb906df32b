"""Pruning methods on the reference model; writes bench/results/prune_reference.json.

Each config runs in a fresh subprocess, through the product path
(`compress_model`: low-memory, block by block where the pass streams): prune
the fp32 reference model, save it, reload the saved directory and score it
under the DESIGN.md perplexity protocol. Recorded per row: perplexity, the
pass's wall time, peak RSS of the process up to the saved model (and its ratio
to the fp32 model's bytes), sparsity per pruned layer (min / max over layers,
the full list in the report), parameter count, and forward latency: the
median of 15 batch-1 prefills of 512 tokens on the reloaded model, taking turns
with the dense model loaded in the same process; forward_time_ratio is the
median of the 15 paired ratios.
Calibration: 128 windows x 512 tokens of the WikiText-2 validation split, seed 0.

    .venv/bin/python bench/prune_reference.py [--configs acceptance|structured|all|CFG,...] [--windows 64]

Configs:
  dense                       the unpruned model (perplexity, parameters, latency baseline)
  METHOD:SPEC                 METHOD magnitude | wanda | sparsegpt, SPEC a fraction (0.5) or N:M (2:4)
  struct:KIND:RATIO[:OPT]     KIND channels | heads | layers; OPT an importance (magnitude, loss) or, for
                              heads, kv (prune whole KV groups)
  peer:llmc-METHOD:SPEC       llm-compressor's SparseGPTModifier / WandaPruningModifier in .venv-peers
                              (bench/peers/run_peer.py), on the same model, calibration and eval windows
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quantize_reference import PEER_PYTHON, PEER_SCRIPT, rss_bytes, write_peer_inputs  # noqa: E402

UNSTRUCTURED = ["dense", "magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "peer:llmc-wanda:0.5",
                "peer:llmc-sparsegpt:0.5", "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4", "peer:llmc-wanda:2:4",
                "peer:llmc-sparsegpt:2:4"]
STRUCTURED = ["dense", "struct:channels:0.1", "struct:channels:0.25", "struct:channels:0.25:magnitude",
              "struct:heads:0.333", "struct:heads:0.333:kv", "struct:layers:0.1", "struct:layers:0.25"]
NAMED = {"acceptance": ",".join(UNSTRUCTURED), "structured": ",".join(STRUCTURED),
         "all": ",".join(dict.fromkeys(UNSTRUCTURED + STRUCTURED))}
STRUCT_PASS = {"channels": "prune_channels", "heads": "prune_heads", "layers": "prune_layers"}


def recipe_for(cfg: str):
    from compress.recipe import Recipe

    kind, _, rest = cfg.partition(":")
    if kind in ("magnitude", "wanda", "sparsegpt"):
        spec = {"pattern": rest} if ":" in rest else {"sparsity": float(rest)}
        return Recipe.single(kind, **spec)
    if kind == "struct":
        what, ratio, *opt = rest.split(":")
        fields = {"ratio": float(ratio)}
        if opt == ["kv"]:
            fields["unit"] = "kv"
        elif opt == ["magnitude"]:
            fields.update(importance="magnitude", reconstruct=False)
        elif opt:
            fields["importance"] = opt[0]
        return Recipe.single(STRUCT_PASS[what], **fields)
    raise SystemExit(f"bad config {cfg!r}: see --help")


def latency(models: list, threads: int, tokens: int = 512, repeats: int = 15) -> list[list[float]]:
    """Seconds of batch-1 forwards over `tokens` tokens, `repeats` per model, the models taking turns.

    Taking turns (after one warm-up each) exposes every model to the same
    drifts of the machine (frequency, cache, other load), so the ratio of two
    models' times is measured far more tightly than either time alone.
    """
    import torch

    torch.set_num_threads(threads)
    ids = torch.randint(100, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(repeats + 1):
            for m, t in zip(models, times, strict=True):
                t0 = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                if i:
                    t.append(time.perf_counter() - t0)
    return times


def one(cfg: str, windows: int, threads: int) -> dict:
    """Prune with the product path, reload the saved model, score it, time its forward."""
    import torch

    from compress.models import load_model
    from compress.reference import reference_model_dir
    from compress.runner import compress_model, evaluate, weights_bytes

    torch.set_num_threads(threads)
    rss0 = rss_bytes()
    row: dict = {"config": cfg}
    with tempfile.TemporaryDirectory() as d:
        if cfg == "dense":
            lm = load_model(None)
            row.update(prune_seconds=0.0, steps=[])
        else:
            recipe = recipe_for(cfg)
            summary = compress_model(None, recipe, Path(d) / "p")
            row["peak_rss_bytes_during_prune"] = rss_bytes()
            rep = summary["reports"][0]
            row.update(steps=recipe.to_list(), prune_seconds=round(rep["seconds"], 1), report=rep)
            zeros = rep["config"].get("zeros_per_module")
            if zeros:
                row.update(sparsity=rep["metrics"]["sparsity"], layers=len(zeros),
                           layer_sparsity_min=min(zeros.values()), layer_sparsity_max=max(zeros.values()))
            lm = load_model(summary["out"])
        row["parameters"] = sum(p.numel() for p in lm.model.parameters())  # tied embedding counted once
        row["fp32_model_bytes"] = weights_bytes(reference_model_dir())  # the unpruned fp32 checkpoint
        if "peak_rss_bytes_during_prune" in row:
            row["peak_rss_over_fp32_model"] = row["peak_rss_bytes_during_prune"] / row["fp32_model_bytes"]
        row["rss_after_imports_bytes"] = rss0
        if cfg == "dense":
            row.update(forward_seconds_1x512=statistics.median(latency([lm.model], threads)[0]), forward_time_ratio=1.0)
        else:  # against the dense model in this process, forwards taking turns
            ours, dense = latency([lm.model, load_model(None).model], threads)
            row.update(forward_seconds_1x512=statistics.median(ours),
                       dense_forward_seconds_1x512=statistics.median(dense),
                       forward_time_ratio=statistics.median(a / b for a, b in zip(ours, dense, strict=True)))
        r = evaluate(lm, ["wikitext2"], options={"windows": windows})["wikitext2"]
    row.update(perplexity=r["perplexity"], protocol=r["protocol"])
    return row


def run_peer(cfg: str, inputs: dict, threads: int, tmp: Path) -> dict:
    """peer:llmc-METHOD:SPEC in .venv-peers; a failure comes back as a row with "error"."""
    _, method, spec = cfg.split(":", 2)
    row: dict = {"config": cfg, "tool": "llm-compressor"}
    if not PEER_PYTHON.is_file():
        return {**row, "error": f"{PEER_PYTHON} not found: run `make peers-setup`"}
    out = tmp / f"{method}-{spec.replace(':', 'of')}.json"
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--method", method, "--sparsity-spec", spec,
           "--model", inputs["model"], "--calib", inputs["calib"], "--eval", inputs["eval"],
           "--out", str(out), "--threads", str(threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if not out.is_file():
        return {**row, "error": f"run_peer.py exited {p.returncode} without a result: {p.stderr[-2000:]}"}
    peer = json.loads(out.read_text())
    row["peer"] = peer
    if p.returncode != 0 or "error" in peer:
        return {**row, "error": peer.get("error", f"run_peer.py exited {p.returncode}"), "stderr_tail": p.stderr[-2000:]}
    row.update(perplexity=peer["perplexity"], prune_seconds=round(peer["quantize_seconds"], 1),
               peak_rss_bytes_during_prune=peer["peak_rss_bytes"], sparsity=peer.get("sparsity"),
               layer_sparsity_min=peer.get("layer_sparsity_min"), layer_sparsity_max=peer.get("layer_sparsity_max"),
               protocol={**inputs["protocol"], "scored_by": "bench/peers/run_peer.py in .venv-peers",
                         "windows_scored": peer["n_windows"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="acceptance", help="acceptance | structured | all | CFG,CFG,...")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(HERE / "results" / "prune_reference.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.windows, args.threads)))
        return
    from compress.artifact import package_versions, write_json_atomic

    configs = NAMED.get(args.configs, args.configs).split(",")
    meta = {"command": " ".join(["python", *sys.argv]), "calibration": "wikitext2 validation, 128 x 512 tokens, seed 0",
            "threads": args.threads, "versions": package_versions()}
    rows: list[dict] = []

    def save(done: bool) -> None:  # after every row: a long run that stops keeps what it measured
        dense = next((r for r in rows if r["config"] == "dense" and "error" not in r), None)
        for r in rows:
            if dense and "perplexity" in r:
                r["rise_over_dense"] = r["perplexity"] / dense["perplexity"] - 1
            if dense and "parameters" in r:
                r["parameter_ratio"] = r["parameters"] / dense["parameters"]
        write_json_atomic(Path(args.output), {**meta, "complete": done, "configs": configs, "results": rows})

    with tempfile.TemporaryDirectory(prefix="prune-peers-") as tmp:
        inputs = write_peer_inputs(Path(tmp), args.windows) if any(c.startswith("peer:") for c in configs) else None
        for cfg in configs:
            if cfg.startswith("peer:"):
                row = run_peer(cfg, inputs, args.threads, Path(tmp))
            else:
                p = subprocess.run([sys.executable, __file__, "--one", cfg, "--windows", str(args.windows),
                                    "--threads", str(args.threads)], capture_output=True, text=True)
                row = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                       {"config": cfg, "error": f"exited {p.returncode}", "stderr_tail": p.stderr[-3000:]})
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            rows.append(row)
            save(False)
            if "error" in row:
                print(f"{cfg:28s} FAILED: {row['error'][:500]}", flush=True)
                continue
            print(f"{cfg:28s} ppl {row['perplexity']:8.3f}  {row.get('prune_seconds', 0):6.0f} s  "
                  f"rss {row.get('peak_rss_bytes_during_prune', 0) / 2**30:.2f} GiB  "
                  f"sparsity {row.get('sparsity') or 0:.4f}  params {row.get('parameters', 0) / 1e6:.2f} M  "
                  f"fwd {row.get('forward_seconds_1x512', 0):.3f} s ({row.get('forward_time_ratio', 0):.3f}x)", flush=True)
        save(True)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
