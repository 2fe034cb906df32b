"""W8A8 on the reference model: our observers with and without SmoothQuant against torch's dynamic int8 and
ONNX Runtime's own static quantizer, plus ONNX prompt speed; writes bench/results/w8a8_reference.json.

Rows, all scored under the DESIGN.md perplexity protocol (WikiText-2 test, --windows x 1024) in one run,
every calibrated method on the same calibration windows (--calib-samples x 512 tokens of the validation
split, the product's default sampling):

  fp32                         the reference model (torch)
  ours <observer> [sq <a>] [fallback <e>]
                               `compress quantize --bits 8 --activations int8 --observer O [--smoothquant A]
                               [--fallback-error E]`: int8 weights per channel, static per-tensor int8
                               activations (stages whose calibration output error exceeds E left float), scored
                               in torch
                               (W8A8Linear computes what the exported ONNX graph computes; the export check
                               compares the two on every artifact it writes)
  torch dynamic int8           torch.ao.quantization.quantize_dynamic, per-channel int8 weights, activations
                               quantized per tensor at run time (fbgemm/x86), lm_head float as in ours
  ort static <method>          onnxruntime.quantization on the fp32 ONNX graph: calibration through its
                               calibrator API (MinMax, Entropy, Percentile; its defaults), QDQ, uint8
                               activations, per-channel int8 weights, lm_head float; scored in ONNX Runtime

Speed: a 512-token prompt (batch 1, no cache) through ONNX Runtime on --threads threads, median of --runs,
for the fp32 graph, our best static W8A8 export and the best ORT static model, in the same run.

    .venv/bin/python bench/w8a8_reference.py [--windows 64] [--calib-samples 128] [--work DIR]
        [--observers minmax,percentile,mse,kl] [--smoothquant none,0.5,search] [--fallback-errors ,0.01]
        [--ort MinMax,Entropy,Percentile]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibrate.data import CalibConfig, load_calibration  # noqa: E402
from compress.artifact import package_versions, write_json_atomic  # noqa: E402
from compress.data import read_source_text  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.quantize.w8a8 import w8a8_recipe  # noqa: E402
from compress.recipe import Recipe  # noqa: E402
from compress.registry import EXPORTERS  # noqa: E402
from compress.runner import compress_model, evaluate  # noqa: E402
from eval.perplexity import PerplexityConfig, wikitext2  # noqa: E402


def ppl_torch(lm, windows: int) -> tuple[float, float]:
    t = time.perf_counter()
    r = evaluate(lm, ["wikitext2"], options={"windows": windows})["wikitext2"]
    return r["perplexity"], time.perf_counter() - t


def ppl_ort(path: Path, windows: int, threads: int) -> tuple[float, float]:
    from eval.onnx_backend import OrtBackend

    t = time.perf_counter()
    r = wikitext2(OrtBackend(path, threads=threads), PerplexityConfig(windows=windows))
    return r["perplexity"], time.perf_counter() - t


def feeds_for(sess, ids: np.ndarray) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def prompt_seconds(model_file: Path, threads: int, runs: int, tokens: int = 512) -> float:
    """Median seconds of one `tokens`-long prompt through the graph (after a warm-up run)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
    ids = (np.arange(tokens, dtype=np.int64) * 7919 % 400 + 50)[None]  # any valid ids: speed only
    feeds = feeds_for(sess, ids)
    sess.run(["logits"], feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["logits"], feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_dynamic(lm):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {n: per_channel_dynamic_qconfig for n, m in lm.model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    q = copy.copy(lm)
    q.model = quantize_dynamic(copy.deepcopy(lm.model), spec, dtype=torch.qint8)
    return q


def ort_static(fp32_dir: Path, out_dir: Path, method: str, calib: torch.Tensor, work: Path) -> None:
    """ONNX Runtime's static quantizer on our fp32 graph, calibrated chunk by chunk on `calib`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cm = getattr(CalibrationMethod, method)
    # ONNX Runtime's recommended pre-processing: its symbolic shape inference knows the contrib operators,
    # without which the quantizer cannot type the activations and skips them
    model_file = work / "fp32-pre.onnx"
    if not model_file.exists():
        quant_pre_process(str(fp32_dir / "model.onnx"), str(model_file), skip_optimization=True, auto_merge=True)
    proto = onnx.load(str(model_file), load_external_data=False)
    head = [n.name for n in proto.graph.node if n.op_type == "MatMul" and "lm_head_out" in n.output]
    past = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
            if i.name.startswith("past_key_values")}  # (batch, kv heads, past, head dim)
    calibrator = create_calibrator(model_file, ["MatMul"], augmented_model_path=str(work / f"aug-{method}.onnx"),
                                   calibrate_method=cm, extra_options={"symmetric": False})

    class Reader:
        def __init__(self, rows):
            self.rows = list(rows)

        def get_next(self):
            if not self.rows:
                return None
            ids = self.rows.pop(0)[None].numpy()
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            feeds.update({k: np.zeros((1, d[1], 0, d[3]), np.float32) for k, d in past.items()})
            return feeds

    for i in range(0, calib.shape[0], 4):  # the calibrators keep every tensor of a chunk in memory
        calibrator.collect_data(Reader(calib[i:i + 4]))
    cache = work / f"ranges-{method}.json"
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator
    out_dir.mkdir(parents=True, exist_ok=True)
    quantize_static(str(model_file), str(out_dir / "model.onnx"), None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=head, calibrate_method=cm,
                    calibration_cache_path=str(cache),
                    extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
    for f in fp32_dir.iterdir():  # tokenizer and config beside the graph
        if not f.name.startswith("model.onnx") and f.is_file():
            shutil.copy2(f, out_dir / f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--observers", default="minmax,percentile,mse,kl")
    ap.add_argument("--smoothquant", default="none,0.5,search",
                    help="SmoothQuant settings tried with each observer (none: without SmoothQuant)")
    ap.add_argument("--fallback-errors", default="",
                    help="--fallback-error values tried with each observer/SmoothQuant pair ('' in the list: none)")
    ap.add_argument("--ort", default="MinMax,Entropy,Percentile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-speed", action="store_true", help="perplexity rows only: skip the ONNX prompt-speed part")
    ap.add_argument("--work", help="keep artifacts here (default: a temporary directory)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "w8a8_reference.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="w8a8-bench-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    calib_cfg = CalibConfig(samples=args.calib_samples, seq_len=512)
    out = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
           "protocol": {"dataset": "wikitext2 test", "windows": args.windows, "seq_len": 1024},
           "calibration": {"source": "wikitext2 validation", "samples": args.calib_samples, "seq_len": 512},
           "rows": {}, "speed": {}, "versions": package_versions()}
    rows = out["rows"]

    def record(name: str, ppl: float, seconds: float, **extra) -> None:
        rows[name] = {"perplexity": ppl, "eval_seconds": round(seconds, 1), **extra}
        base = rows.get("fp32", {}).get("perplexity")
        if base:
            rows[name]["rise_vs_fp32"] = ppl / base - 1
        print(f"{name:32s} ppl {ppl:.4f}" + (f"  ({100 * (ppl / base - 1):+.2f} %)" if base else ""), flush=True)
        write_json_atomic(Path(args.output), out)

    lm = load_model()
    record("fp32", *ppl_torch(lm, args.windows))
    calib = load_calibration(lm.tokenizer, calib_cfg, read_source_text(calib_cfg.source))

    best: tuple[float, str, Path] | None = None
    for obs in args.observers.split(","):
        fallbacks = list(dict.fromkeys(float(f) if f else None for f in args.fallback_errors.split(",")))
        sqs = [None if s == "none" else s for s in args.smoothquant.split(",") if s]
        for sq, fb in [(s, f) for s in sqs for f in fallbacks]:
            name = f"ours {obs}" + (f" sq {sq}" if sq else "") + (f" fallback {fb:g}" if fb else "")
            art = work / name.replace(" ", "-")
            t = time.perf_counter()
            if not art.exists():
                extra = {"fallback_error": fb} if fb else {}
                compress_model(None, Recipe.from_steps(w8a8_recipe(
                    observer=obs, smoothquant=sq if sq in (None, "search") else float(sq), **extra)), art, calib=calib_cfg)
            qs = time.perf_counter() - t
            (rep,) = [r for r in json.loads((art / "compress.json").read_text())["reports"] if r["name"] == "w8a8"]
            stages = {"max_stage_error": rep["metrics"].get("max_stage_error"),
                      "float_fallback": rep["config"].get("float_fallback", [])}
            ppl, secs = ppl_torch(load_model(art), args.windows)
            record(name, ppl, secs, quantize_seconds=round(qs, 1), **stages)
            if best is None or ppl < best[0]:
                best = (ppl, name, art)

    q = torch_dynamic(lm)
    record("torch dynamic int8", *ppl_torch(q, args.windows))
    del q

    fp32_onnx = work / "fp32-onnx"
    if not fp32_onnx.exists():
        EXPORTERS.get("onnx").export(lm, fp32_onnx, recipe=[], threads=args.threads)
    best_ort: tuple[float, str, Path] | None = None
    for method in [m for m in args.ort.split(",") if m]:
        d = work / f"ort-{method}"
        t = time.perf_counter()
        if not (d / "model.onnx").exists():
            ort_static(fp32_onnx, d, method, calib, work)
        qs = time.perf_counter() - t
        ppl, secs = ppl_ort(d, args.windows, args.threads)
        record(f"ort static {method}", ppl, secs, quantize_seconds=round(qs, 1))
        if best_ort is None or ppl < best_ort[0]:
            best_ort = (ppl, f"ort static {method}", d)

    if args.no_speed:
        write_json_atomic(Path(args.output), out)
        tmp.cleanup()
        return
    # prompt speed in ONNX Runtime: fp32 graph, our best static W8A8 export, ORT's best static model
    graphs = {"onnx fp32": fp32_onnx / "model.onnx"}
    if best is not None:
        ours_onnx = work / ("onnx-" + best[1].replace(" ", "-"))  # the export of that very artifact
        if not ours_onnx.exists():
            EXPORTERS.get("onnx").export(load_model(best[2]), ours_onnx, recipe=[], threads=args.threads)
        graphs[f"onnx int8 ({best[1]})"] = ours_onnx / "model.onnx"
        out["best_ours_export"] = json.loads((ours_onnx / "compress.json").read_text())["format_exported"]
    if best_ort is not None:
        graphs[f"onnx int8 ({best_ort[1]})"] = best_ort[2] / "model.onnx"
    for name, f in graphs.items():
        s = prompt_seconds(f, args.threads, args.runs)
        out["speed"][name] = {"seconds_512_tokens": s, "tokens_per_second": 512 / s}
    base = out["speed"]["onnx fp32"]["seconds_512_tokens"]
    for name, v in out["speed"].items():
        v["speedup_vs_fp32"] = base / v["seconds_512_tokens"]
        print(f"{name:40s} {v['tokens_per_second']:8.1f} tok/s  x{v['speedup_vs_fp32']:.2f}", flush=True)
    write_json_atomic(Path(args.output), out)
    tmp.cleanup()


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
