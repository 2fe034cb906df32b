"""Inference speed on the reference model; writes bench/results/decode_speed.json.

Prompt processing (one forward of a 512-token prompt) and greedy decoding of
128 tokens after it, 2 threads, one run, for:

- torch fp32 (the Hugging Face model) and torch with our QuantLinear modules (int4 g128);
- ONNX Runtime, our exporter's fused graph with the KV cache in preallocated buffers that every
  GroupQueryAttention appends to in place (I/O binding; also run with the
  cache copied per step, as optimum's loop does): fp32; our int4 and int8 weights as MatMulNBits at accuracy
  level 0 (float activations, the default export) and 4 (int8 activations,
  exported with a loose --tolerance: the fast int8 kernel, less accurate);
  int4 with the lm_head quantized too ("int4 + head", like llama.cpp's Q4_0,
  whose tied output matrix is Q4_0) (optimum's graph, measured in earlier
  rows, left with optimum-onnx: it does not install beside transformers 5);
- llama.cpp (llama-cpp-python): our GGUF exports (F32, Q8_0 from the int8
  artifact, Q4_0 from the int4 ones) and llama.cpp's own Q8_0 and Q4_0
  (`llama_model_quantize` of our F32 file).

Every backend runs the same lean loop: one prefill call, then one call per
token feeding the previous step's KV cache, argmax in numpy/torch. Speeds
are tokens per second (best of --repeats); ratios are against torch fp32 in
the same run. The artifacts are RTN-quantized here (the method does not
change the speed) unless --int4/--int8 give artifact directories.

    .venv/bin/python bench/decode_speed.py [--threads 2] [--new-tokens 128] [--prompt-tokens 512]

llama.cpp rows need llama-cpp-python (`make llama-setup`); without it they are left out, and said so.
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
        cache, nxt = out.cache, int(out.logits[0, -1].argmax())
        ids = [nxt]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            cache, nxt = out.cache, int(out.logits[0, -1].argmax())
            ids.append(nxt)
        return prefill, time.perf_counter() - t, ids


class LlamaCppLoop:
    """The same greedy loop in llama.cpp: the prompt in one eval, then one eval per token."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)

    def run(self, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
        import numpy as np

        llm = self.llm
        vocab = llm.n_vocab()

        def last_logits():  # the last token's logits (without logits_all llama-cpp-python keeps none)
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt[0].tolist())
        prefill = time.perf_counter() - t
        nxt = int(np.argmax(last_logits()))
        gen = [nxt]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits()))
            gen.append(nxt)
        return prefill, time.perf_counter() - t, gen


class OrtLoop:
    """A lean greedy loop over a decoder graph with optimum's input/output names and a KV cache, the cache copied
    into the feeds each step, run by an InferenceSession."""

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


class SharedKvLoop(OrtLoop):
    """Fused graph only: the KV cache in buffers of the final length, bound (I/O binding) as both the past
    and the present of every GroupQueryAttention node, which then appends in place: no step copies the cache."""

    def run(self, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
        import numpy as np
        import onnxruntime as ort

        ids = prompt.numpy().astype(np.int64)
        n = ids.shape[1]
        total = n + new_tokens
        vocab = self.sess.get_outputs()[0].shape[-1]
        bufs = {p: ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, self.inputs[p].shape[1], total, self.inputs[p].shape[3]), np.float32)) for p in self.past}
        prefill_logits = np.zeros((1, n, vocab), np.float32)
        step_logits = np.zeros((1, 1, vocab), np.float32)
        binding = self.sess.io_binding()
        for p_in, p_out in zip(self.past, self.present, strict=True):
            binding.bind_ortvalue_input(p_in, bufs[p_in])
            binding.bind_ortvalue_output(p_out, bufs[p_in])
        t = time.perf_counter()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, n), np.int64))
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(prefill_logits))
        self.sess.run_with_iobinding(binding)
        prefill = time.perf_counter() - t
        nxt = int(prefill_logits[0, -1].argmax())
        gen = [nxt]
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(step_logits))
        t = time.perf_counter()
        for step in range(new_tokens - 1):
            binding.bind_cpu_input("input_ids", np.array([[nxt]], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, n + step + 1), np.int64))
            self.sess.run_with_iobinding(binding)
            nxt = int(step_logits[0, -1].argmax())
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
    arts = {"int4": Path(args.int4) if args.int4 else work / "w4", "int8": Path(args.int8) if args.int8 else work / "w8",
            "int4 + head": work / "w4h"}
    made = {"int4": ["--bits", "4", "--group-size", "128"], "int8": ["--bits", "8", "--group-size", "-1"],
            "int4 + head": ["--bits", "4", "--group-size", "128", "--ignore", "model.embed_tokens"]}
    for k, path in arts.items():
        if not path.exists():
            subprocess.run([*cli, "quantize", "--method", "rtn", *made[k], "--out", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
    onnx_dirs = {"fp32": work / "fp32-onnx", "int4": work / "w4-onnx", "int8": work / "w8-onnx",
                 "int4 + head": work / "w4h-onnx", "int4 acc4": work / "w4-onnx-acc4",
                 "int8 acc4": work / "w8-onnx-acc4", "int4 + head acc4": work / "w4h-onnx-acc4"}
    for k, path in onnx_dirs.items():
        if not path.exists():
            art = k.removesuffix(" acc4")
            src = [] if k == "fp32" else [str(arts[art])]
            level = ["--accuracy-level", "4", "--tolerance", "10"] if k.endswith("acc4") else []
            subprocess.run([*cli, "export", *src, "--format", "onnx", "--out", str(path), "--threads",
                            str(args.threads), *level], check=True, stdout=subprocess.DEVNULL)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: the llama.cpp rows are left out (make llama-setup)", flush=True)
    ggufs: dict[str, Path] = {}
    if llama_cpp is not None:
        ggufs = {"our F32": work / "f32-gguf", "our Q8_0 (int8 per-channel)": work / "w8-gguf",
                 "our Q4_0 (int4 g128)": work / "w4-gguf", "our Q4_0 (int4 g128 + head)": work / "w4h-gguf",
                 "own Q8_0": work / "own-q8_0", "own Q4_0": work / "own-q4_0"}
        src = {"our F32": None, "our Q8_0 (int8 per-channel)": arts["int8"], "our Q4_0 (int4 g128)": arts["int4"],
               "our Q4_0 (int4 g128 + head)": arts["int4 + head"]}
        for k, path in ggufs.items():
            if path.exists() or k.startswith("own"):
                continue
            subprocess.run([*cli, "export", *([str(src[k])] if src[k] else []), "--format", "gguf", "--out",
                            str(path), "--threads", str(args.threads)], check=True, stdout=subprocess.DEVNULL)
        for k, ftype in (("own Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("own Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
            ggufs[k].mkdir(exist_ok=True)
            if not (ggufs[k] / "model.gguf").exists():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.nthread = ftype, args.threads
                src_file, dst_file = str(ggufs["our F32"] / "model.gguf"), str(ggufs[k] / "model.gguf")
                if llama_cpp.llama_model_quantize(src_file.encode(), dst_file.encode(), params) != 0:
                    raise RuntimeError(f"llama_model_quantize failed for {k}")

    lm = load_model(None)
    text = (ROOT / "compress" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    prompt = torch.tensor([lm.tokenizer(text[:20000], add_special_tokens=False).input_ids[: args.prompt_tokens]])
    runs = {"torch fp32": lambda: torch_loop(lm.model, prompt, args.new_tokens)}
    q4 = load_model(arts["int4"])
    runs["torch int4 (QuantLinear)"] = lambda: torch_loop(q4.model, prompt, args.new_tokens)
    # the fused graphs run with the KV cache shared in place (SharedKvLoop)
    loops = {k: SharedKvLoop(p, args.threads) for k, p in onnx_dirs.items()}
    loops["int4 copy-kv"] = OrtLoop(onnx_dirs["int4"], args.threads)
    labels = {"fp32": "onnxruntime fp32", "int4": "onnxruntime int4 (MatMulNBits)",
              "int8": "onnxruntime int8 (MatMulNBits)", "int4 + head": "onnxruntime int4 + head (MatMulNBits)",
              "int4 acc4": "onnxruntime int4 (MatMulNBits, int8 act.)",
              "int8 acc4": "onnxruntime int8 (MatMulNBits, int8 act.)",
              "int4 + head acc4": "onnxruntime int4 + head (MatMulNBits, int8 act.)",
              "int4 copy-kv": "onnxruntime int4 (MatMulNBits, KV cache copied per step)"}
    for k, label in labels.items():
        runs[label] = lambda k=k: loops[k].run(prompt, args.new_tokens)
    n_ctx = args.prompt_tokens + args.new_tokens + 8
    ll_loops = {k: LlamaCppLoop(p / "model.gguf", args.threads, n_ctx) for k, p in ggufs.items()}
    for k in ggufs:
        runs[f"llama.cpp {k}"] = lambda k=k: ll_loops[k].run(prompt, args.new_tokens)

    rows = {}
    for name, fn in runs.items():
        best_p, best_d, gen = float("inf"), float("inf"), []
        for _ in range(args.repeats):
            p, d, gen = fn()
            best_p, best_d = min(best_p, p), min(best_d, d)
        rows[name] = {"prompt_tokens_per_second": round(args.prompt_tokens / best_p, 1),
                      "decode_tokens_per_second": round((args.new_tokens - 1) / best_d, 2),
                      "text": lm.tokenizer.decode(gen[:24])}
        print(f"{name:48s} prompt {rows[name]['prompt_tokens_per_second']:8.1f} tok/s   "
              f"decode {rows[name]['decode_tokens_per_second']:7.2f} tok/s   {rows[name]['text']!r}", flush=True)
    base = rows["torch fp32"]
    own_q4 = rows.get("llama.cpp own Q4_0")
    for r in rows.values():
        r["decode_vs_torch_fp32"] = round(r["decode_tokens_per_second"] / base["decode_tokens_per_second"], 2)
        r["prompt_vs_torch_fp32"] = round(r["prompt_tokens_per_second"] / base["prompt_tokens_per_second"], 2)
        if own_q4:
            r["decode_vs_llama_cpp_q4_0"] = round(r["decode_tokens_per_second"] / own_q4["decode_tokens_per_second"], 2)
    sizes = {k: sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".onnx", ".onnx_data"))
             for k, p in onnx_dirs.items()}
    sizes.update({f"gguf {k}": (p / "model.gguf").stat().st_size for k, p in ggufs.items()})
    out = {"command": " ".join(["python", *sys.argv]), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows,
           "bytes": sizes, "versions": package_versions()}
    write_json_atomic(Path(args.output), out)
    print(json.dumps({k: v["decode_vs_torch_fp32"] for k, v in rows.items()}))
    tmp.cleanup()


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
