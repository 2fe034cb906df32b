"""Weight quantization methods on the reference model; writes bench/results/quantize_reference.json.

For each (method, bits, group size) it runs, in a fresh subprocess, what
`compress quantize` runs: the fp32 reference model processed block by block
(low-memory path), quantized (wall time of the passes, peak RSS of the process
up to the saved artifact), saved as a packed artifact; then it counts bits
per quantized weight from the tensors on disk, reloads the artifact and scores
it under the DESIGN.md perplexity protocol. Method `awq+gptq` is AWQ's scales
and clipping followed by GPTQ's rounding.
Calibration: 128 windows x 512 tokens of the WikiText-2 validation split, seed 0.

    .venv/bin/python bench/quantize_reference.py [--configs rtn:4:128,gptq:4:128,...] [--windows 64]

Peers: a config `peer:METHOD:BITS:GROUP[:asym]` (:asym for llm-compressor and AutoRound only; METHOD one of
none, hqq, bnb-nf4, llmc-gptq, llmc-awq, autoround (AutoRound's default recipe, 200 iterations),
autoround-light (its light recipe, 50 iterations, lr 5e-3); e.g. peer:hqq:4:64, peer:llmc-gptq:4:64,
peer:bnb-nf4:4:64, peer:autoround:4:128, peer:autoround-light:4:64:asym, peer:none:32:0 for the unquantized
model) runs another toolkit's quantizer
(llm-compressor, HQQ, bitsandbytes, auto-round) on the same fp32 reference model
directory, in its own virtual environment `.venv-peers` (`make peers-setup`),
through bench/peers/run_peer.py. Once per run this script writes the same
calibration windows our methods get (128 x 512, seed 0) and the first
`--windows` evaluation windows of our perplexity protocol (tokenized here, with
our tokenizer and window cutting) to safetensors files, so every tool sees the
same tokens; the peer scores them with the same NLL definition. A peer row has
the keys of ours where they overlap plus "tool" and the peer's full JSON under
"peer"; a failing peer is recorded with its "error" and the run goes on.
Configs of both kinds mix freely in --configs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = "rtn:4:128,gptq:4:128,rtn:4:64,gptq:4:64,gptq:3:64,gptq:8:-1,rtn:8:-1"
# issue 3's benchmark matrix: every method at W4 g64 / g128 / per-channel, W3 g64 and W8 per-channel
# (asymmetric 2-4 bit grids, symmetric W8), beside the peers at the group size they all support (64).
# "acceptance" is the part the acceptance compares in one run: our best W4/W3 g64, our GPTQ
# against llm-compressor's on the same grid (time), and every peer (llm-compressor AWQ, the slowest, last)
_OURS = [f"{m}:{cfg}" for m in ("awq+gptq", "gptq", "awq", "rtn")
         for cfg in ("4:64:asym", "3:64:asym", "4:128:asym", "4:-1:asym", "8:-1")]
_PEERS = ["peer:llmc-gptq:4:64:asym", "peer:hqq:4:64", "peer:bnb-nf4:4:64", "peer:llmc-gptq:3:64:asym",
          "peer:hqq:3:64", "peer:llmc-awq:4:64:asym"]
ACCEPTANCE = ",".join(["awq+gptq:4:64:asym", "awq+gptq:3:64:asym", "gptq:4:64:asym", *_PEERS])
MATRIX = ",".join([*ACCEPTANCE.split(","), *[c for c in _OURS if c not in ACCEPTANCE.split(",")]])
# "matrix-rest": the matrix rows that the acceptance run does not have (our 17 other configs), so the
# matrix can be completed in a second run (~1.5 h here) beside bench/results/quantize_acceptance.json
MATRIX_REST = ",".join(c for c in _OURS if c not in ACCEPTANCE.split(","))
NAMED = {"matrix": MATRIX, "acceptance": ACCEPTANCE, "matrix-rest": MATRIX_REST}
ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = ROOT / "bench" / "peers" / "run_peer.py"
sys.path.insert(0, str(PEER_SCRIPT.parent))
from run_peer import rss_bytes  # noqa: E402  (stdlib only: the same peak-RSS reading as the peers')

PEER_TOOLS = {"none": "transformers", "hqq": "hqq", "bnb-nf4": "bitsandbytes",
              "llmc-gptq": "llm-compressor", "llmc-awq": "llm-compressor",
              "autoround": "auto-round", "autoround-light": "auto-round"}
ASYM_PEERS = ("llmc-gptq", "llmc-awq", "autoround", "autoround-light")  # the peers with a sym/asym choice


def parse_config(cfg: str) -> tuple[str, int, int, bool, int]:
    """method:bits:group[:sym|asym][:tuneN] -> (method, bits, group, symmetric, tune_steps)."""
    m, b, g, *rest = cfg.split(":")
    symmetric, tune = True, 0
    for r in rest:
        if r in ("sym", "asym"):
            symmetric = r == "sym"
        elif r.startswith("tune") and r[4:].isdigit():
            tune = int(r[4:])
        else:
            raise SystemExit(f"bad config {cfg!r}: method:bits:group[:sym|asym][:tuneN]")
    return m, int(b), int(g), symmetric, tune


def one(method: str, bits: int, group: int, symmetric: bool, windows: int, threads: int, tune_steps: int = 0) -> dict:
    """Quantize with the product path (`compress_model`: low-memory, block by block, unless the scales are
    tuned, which needs the whole model) and score the artifact."""
    import torch
    from safetensors import safe_open

    from compress.cli.quantize import _recipe
    from compress.models import load_model
    from compress.runner import compress_model, evaluate

    torch.set_num_threads(threads)
    recipe = _recipe({"bits": bits, "group_size": group, "symmetric": symmetric}, method,
                     tune_steps=tune_steps)  # what `compress quantize` runs
    with tempfile.TemporaryDirectory() as d:
        summary = compress_model(None, recipe, Path(d) / "a")
        rss = rss_bytes()
        seconds = sum(r["seconds"] for r in summary["reports"])
        out = Path(summary["out"])
        mods = json.loads((out / "compress.json").read_text())["quantization"]["modules"]
        n_w = sum(m["in_features"] * m["out_features"] for m in mods.values())
        n_b = 0
        for shard in sorted(out.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                keys = set(f.keys())
                for name in mods:
                    for t in ("weight_packed", "weight_scale", "weight_zero_point"):
                        if f"{name}.{t}" in keys:
                            x = f.get_tensor(f"{name}.{t}")
                            n_b += x.numel() * x.element_size() * 8
        r = evaluate(load_model(out), ["wikitext2"], options={"windows": windows})["wikitext2"]
    tuned = {f"scale_tune_{k}": v for rep in summary["reports"] if rep["name"] == "scale_tune"
             for k, v in rep["metrics"].items()}
    return {"method": method, "bits": bits, "group_size": group, "symmetric": symmetric,
            **({"tune_steps": tune_steps, **tuned} if tune_steps else {}),
            "steps": recipe.to_list(), "perplexity": r["perplexity"], "bits_per_weight_on_disk": n_b / n_w,
            "quantize_seconds": round(seconds, 1), "peak_rss_bytes_during_quantize": rss,
            "protocol": r["protocol"]}


class _WindowRecorder:
    """A scoring backend that keeps the windows our perplexity task cuts instead of scoring them."""

    name = "record"

    def __init__(self, tokenizer) -> None:
        from torch import nn

        from eval.backends import TorchBackend

        self._inner = TorchBackend(nn.Identity(), tokenizer)  # its encode(): the tokenization we score
        self.bos_token_id = tokenizer.bos_token_id
        self.windows: list = []

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text)

    def decode(self, ids) -> str:
        return self._inner.decode(ids)

    def token_nll(self, ids, *, bos=None):
        import torch

        self.windows.append(ids.clone())
        return torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64)


def write_peer_inputs(dest: Path, windows: int, calib_cfg=None) -> dict:
    """Write calib.safetensors (`ids`) and eval.safetensors (`windows`) for the reference model."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from calibrate.data import CalibConfig, load_calibration
    from compress.data import read_source_text
    from compress.reference import reference_model_dir
    from eval.perplexity import PerplexityConfig, wikitext2

    model_dir = reference_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)  # what load_model() gives for the reference model
    calib_cfg = calib_cfg or CalibConfig()
    ids = load_calibration(tok, calib_cfg, read_source_text(calib_cfg.source))
    rec = _WindowRecorder(tok)
    proto = wikitext2(rec, PerplexityConfig(windows=windows))  # the task itself cuts the windows
    ev = torch.cat(rec.windows).contiguous()
    dest.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids.contiguous()}, str(dest / "calib.safetensors"))
    save_file({"windows": ev}, str(dest / "eval.safetensors"))
    return {"model": str(model_dir), "calib": str(dest / "calib.safetensors"),
            "eval": str(dest / "eval.safetensors"), "calib_shape": list(ids.shape),
            "eval_shape": list(ev.shape), "protocol": proto["protocol"]}


def run_peer(cfg: str, inputs: dict, threads: int, tmp: Path) -> dict:
    """Run one `peer:METHOD:BITS:GROUP[:asym]` config in .venv-peers; a failure comes back as a row with "error"."""
    parts = cfg.split(":")
    method = parts[1] if len(parts) > 1 else ""
    row: dict = {"config": cfg, "method": method, "tool": PEER_TOOLS.get(method, "?")}
    asym = parts[4:] == ["asym"]
    if (len(parts) not in (4, 5) or method not in PEER_TOOLS or parts[4:] not in ([], ["asym"])
            or not all(x.lstrip("-").isdigit() for x in parts[2:4])):
        return {**row, "error": f"bad peer config {cfg!r}: peer:METHOD:BITS:GROUP[:asym], METHOD in {sorted(PEER_TOOLS)}"}
    if asym and method not in ASYM_PEERS:
        return {**row, "error": f"bad peer config {cfg!r}: :asym applies to {', '.join(ASYM_PEERS)} only"}
    row.update(bits=int(parts[2]), group_size=int(parts[3]))
    if not PEER_PYTHON.is_file():
        return {**row, "error": f"{PEER_PYTHON} not found: run `make peers-setup` (bash bench/peers/setup.sh)"}
    out = tmp / f"{method}-{'-'.join(parts[2:])}.json"
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--method", method, "--bits", parts[2], "--group", parts[3],
           "--model", inputs["model"], "--calib", inputs["calib"], "--eval", inputs["eval"],
           "--out", str(out), "--threads", str(threads), "--work", str(tmp / f"work-{method}-{'-'.join(parts[2:])}"),
           *(["--asym"] if asym else [])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if not out.is_file():
        return {**row, "error": f"run_peer.py exited {p.returncode} without a result: {p.stderr[-2000:]}"}
    peer = json.loads(out.read_text())
    row.update(symmetric=peer.get("symmetric"), peer=peer)
    if p.returncode != 0 or "error" in peer:
        return {**row, "error": peer.get("error", f"run_peer.py exited {p.returncode}"),
                "stderr_tail": p.stderr[-2000:]}
    row.update(perplexity=peer["perplexity"], bits_per_weight_on_disk=peer["bits_per_weight"],
               bits_note=peer["bits_note"], quantize_seconds=round(peer["quantize_seconds"], 1),
               peak_rss_bytes_during_quantize=peer["peak_rss_bytes"],
               protocol={**inputs["protocol"], "scored_by": "bench/peers/run_peer.py in .venv-peers",
                         "windows_scored": peer["n_windows"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT,
                    help="method:bits:group[:asym][:tuneN],... (symmetric unless :asym; :tuneN adds N steps of "
                         "scale tuning after rounding); 'matrix': issue 3's full matrix; "
                         "'acceptance': its acceptance comparison; 'matrix-rest': the matrix less the acceptance rows")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "quantize_reference.json"))
    args = ap.parse_args()
    if args.one:
        m, b, g, sym, tune = parse_config(args.one)
        print(json.dumps(one(m, b, g, sym, args.windows, args.threads, tune)))
        return
    from compress.artifact import package_versions, write_json_atomic

    fp32 = json.loads((Path(__file__).parent / "results" / "rtn_reference.json").read_text())
    base = fp32["results"]["fp32"]["perplexity"]
    rows = []
    configs = NAMED.get(args.configs, args.configs).split(",")
    meta = {"command": " ".join(["python", *sys.argv]),
            "fp32_perplexity": base, "fp32_from": "bench/results/rtn_reference.json",
            "calibration": "wikitext2 validation, 128 x 512 tokens, seed 0",
            "threads": args.threads, "versions": package_versions()}

    def save(done: bool) -> None:  # after every row, so a long run that stops keeps what it measured
        write_json_atomic(Path(args.output), {
            **meta, "complete": done, "configs": configs,
            **({"peer_inputs": {k: inputs[k] for k in ("model", "calib_shape", "eval_shape")}} if inputs else {}),
            "results": rows})

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        inputs = None
        if any(c.startswith("peer:") for c in configs):
            inputs = write_peer_inputs(Path(tmp), args.windows)
        for cfg in configs:
            if cfg.startswith("peer:"):
                row = run_peer(cfg, inputs, args.threads, Path(tmp))
                if "error" in row:
                    rows.append(row)
                    save(False)
                    print(f"{cfg:12s} FAILED: {row['error'][:500]}", flush=True)
                    continue
            else:
                p = subprocess.run([sys.executable, __file__, "--one", cfg, "--windows", str(args.windows),
                                    "--threads", str(args.threads)], capture_output=True, text=True)
                if p.returncode != 0:
                    rows.append({"config": cfg, "error": f"exited {p.returncode}", "stderr_tail": p.stderr[-3000:]})
                    save(False)
                    print(f"{cfg:12s} FAILED:\n{p.stderr[-3000:]}", flush=True)
                    continue
                row = json.loads(p.stdout.strip().splitlines()[-1])
            row.setdefault("config", cfg)
            row["rise_over_fp32"] = row["perplexity"] / base - 1
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            rows.append(row)
            save(False)
            print(f"{cfg:12s} ppl {row['perplexity']:.3f} (+{100 * row['rise_over_fp32']:.1f} %) "
                  f"{row['bits_per_weight_on_disk']:.3f} bpw  {row['quantize_seconds']:.0f} s  "
                  f"{row['peak_rss_bytes_during_quantize'] / 2**30:.2f} GiB", flush=True)
        save(True)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
