"""Inference speed on the reference model; writes bench/results/decode_speed.json.

Prompt processing (one forward of a 512-token prompt) and greedy decoding of
128 tokens after it, 2 threads, one run, for:

- torch fp32 (the Hugging Face model);
- torch with our QuantLinear modules (int4 g128 and int8 per-channel artifacts);
- ONNX Runtime fp32 (our exporter, no quantized layers);
- ONNX Runtime with our int4 and int8 weights (MatMulNBits), at accuracy
  level 0 (float activations, the default export) and 4 (int8 activations,
  exported with a loose --tolerance: the fast int8 kernel, less accurate).

Every backend runs the same lean loop: one prefill call, then one call per
token feeding the previous step's KV cache, argmax in numpy/torch. Speeds
are tokens per second (best of --repeats); ratios are against torch fp32 in
the same run. The int4/int8 artifacts are RTN-quantized here (the method
does not change the speed) unless --int4/--int8 give artifact directories.

    .venv/bin/python bench/decode_speed.py [--threads 2] [--new-tokens 128] [--prompt-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def torch_loop(model, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, generated ids) with the HF KV cache."""
    import torch

    with torch.inference_mode():
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
        ids = [nxt]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            ids.append(nxt)
        return prefill, time.perf_counter() - t, ids


class OrtLoop:
    """A lean greedy loop over an optimum-exported decoder with KV cache, run by an InferenceSession."""

    def __init__(self, onnx_dir: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.present = [n for n in self.outputs if n.startswith("present")]

    def run(self, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
        import numpy as np

        ids = prompt.numpy().astype(np.int64)
        n = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name in self.past:
            shape = [1 if i == 0 else (0 if i == 2 else d) for i, d in enumerate(self.inputs[name].shape)]
            feeds[name] = np.zeros(shape, np.float32)
        t = time.perf_counter()
        outs = dict(zip(self.outputs, self.sess.run(None, feeds), strict=True))
        prefill = time.perf_counter() - t
        nxt = int(outs["logits"][0, -1].argmax())
        gen = [nxt]
        t = time.perf_counter()
        for step in range(new_tokens - 1):
            pos = n + step
            feeds = {"input_ids": np.array([[nxt]], np.int64), "attention_mask": np.ones((1, pos + 1), np.int64)}
            if "position_ids" in self.inputs:
                feeds["position_ids"] = np.array([[pos]], np.int64)
            for p_in, p_out in zip(self.past, self.present, strict=True):
                feeds[p_in] = outs[p_out]
            outs = dict(zip(self.outputs, self.sess.run(None, feeds), strict=True))
            nxt = int(outs["logits"][0, -1].argmax())
            gen.append(nxt)
        return prefill, time.perf_counter() - t, gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--int4", help="int4 artifact directory (default: RTN W4 g128 made here)")
    ap.add_argument("--int8", help="int8 artifact directory (default: RTN W8 per-channel made here)")
    ap.add_argument("--work", help="keep artifacts and ONNX exports here (default: a temporary directory)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "decode_speed.json"))
    args = ap.parse_args()

    import torch

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="decode-speed-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cli = [str(Path(sys.executable).parent / "compress")]
    arts = {"int4": Path(args.int4) if args.int4 else work / "w4", "int8": Path(args.int8) if args.int8 else work / "w8"}
    made = {"int4": ["--bits", "4", "--group-size", "128"], "int8": ["--bits", "8", "--group-size", "-1"]}
    for k, path in arts.items():
        if not path.exists():
            subprocess.run([*cli, "quantize", "--method", "rtn", *made[k], "--out", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
    onnx_dirs = {"fp32": work / "fp32-onnx", "int4": work / "w4-onnx", "int8": work / "w8-onnx",
                 "int4 acc4": work / "w4-onnx-acc4", "int8 acc4": work / "w8-onnx-acc4"}
    for k, path in onnx_dirs.items():
        if not path.exists():
            src = [] if k == "fp32" else [str(arts[k.split()[0]])]
            level = ["--accuracy-level", "4", "--tolerance", "10"] if k.endswith("acc4") else []
            subprocess.run([*cli, "export", *src, "--format", "onnx", "--out", str(path), "--threads",
                            str(args.threads), *level], check=True, stdout=subprocess.DEVNULL)

    lm = load_model(None)
    text = (ROOT / "compress" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    prompt = torch.tensor([lm.tokenizer(text[:20000], add_special_tokens=False).input_ids[: args.prompt_tokens]])
    runs = {"torch fp32": lambda: torch_loop(lm.model, prompt, args.new_tokens)}
    q = {k: load_model(p) for k, p in arts.items()}
    runs["torch int4 (QuantLinear)"] = lambda: torch_loop(q["int4"].model, prompt, args.new_tokens)
    runs["torch int8 (QuantLinear)"] = lambda: torch_loop(q["int8"].model, prompt, args.new_tokens)
    loops = {k: OrtLoop(p, args.threads) for k, p in onnx_dirs.items()}
    runs["onnxruntime fp32"] = lambda: loops["fp32"].run(prompt, args.new_tokens)
    runs["onnxruntime int4 (MatMulNBits)"] = lambda: loops["int4"].run(prompt, args.new_tokens)
    runs["onnxruntime int8 (MatMulNBits)"] = lambda: loops["int8"].run(prompt, args.new_tokens)
    runs["onnxruntime int4 (MatMulNBits, int8 act.)"] = lambda: loops["int4 acc4"].run(prompt, args.new_tokens)
    runs["onnxruntime int8 (MatMulNBits, int8 act.)"] = lambda: loops["int8 acc4"].run(prompt, args.new_tokens)

    rows = {}
    for name, fn in runs.items():
        best_p, best_d, gen = float("inf"), float("inf"), []
        for _ in range(args.repeats):
            p, d, gen = fn()
            best_p, best_d = min(best_p, p), min(best_d, d)
        rows[name] = {"prompt_tokens_per_second": round(args.prompt_tokens / best_p, 1),
                      "decode_tokens_per_second": round((args.new_tokens - 1) / best_d, 2),
                      "text": lm.tokenizer.decode(gen[:24])}
        print(f"{name:32s} prompt {rows[name]['prompt_tokens_per_second']:8.1f} tok/s   "
              f"decode {rows[name]['decode_tokens_per_second']:7.2f} tok/s   {rows[name]['text']!r}", flush=True)
    base = rows["torch fp32"]
    for r in rows.values():
        r["decode_vs_torch_fp32"] = round(r["decode_tokens_per_second"] / base["decode_tokens_per_second"], 2)
        r["prompt_vs_torch_fp32"] = round(r["prompt_tokens_per_second"] / base["prompt_tokens_per_second"], 2)
    sizes = {k: sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".onnx", ".onnx_data"))
             for k, p in onnx_dirs.items()}
    out = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows,
           "onnx_bytes": sizes, "versions": package_versions()}
    write_json_atomic(Path(args.output), out)
    print(json.dumps({k: v["decode_vs_torch_fp32"] for k, v in rows.items()}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
