"""GGUF artifacts of the reference model in llama.cpp; writes bench/results/gguf_reference.json.

For each of our quantized artifacts (RTN W8 per-channel -> Q8_0, RTN W4 g32
-> Q4_0, and the default AWQ+GPTQ W4 g128 -> Q4_0, every block repeating its
group's scale) the GGUF export is scored twice under the DESIGN.md
perplexity protocol: the artifact itself in torch, and the GGUF file in
llama.cpp (llama-cpp-python). Beside them, llama.cpp's own quantizer
(`llama_model_quantize`) turns our F32 GGUF into its Q8_0 and Q4_0, scored
the same way. llama.cpp tokenizes the whole test text; the bench checks it
gives the token ids our tokenizer gives.

    .venv/bin/python bench/gguf_reference.py [--threads 2] [--windows 64] [--work DIR]

With --work, artifacts and scores already there are reused (a killed run resumes).

Needs llama-cpp-python (`make llama-setup`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARTIFACTS = {  # name -> quantize arguments
    "rtn-w8-perchannel": ["--method", "rtn", "--bits", "8", "--group-size", "-1"],
    "rtn-w4-g32": ["--method", "rtn", "--bits", "4", "--group-size", "32"],
    "awq+gptq-w4-g128": ["--bits", "4", "--group-size", "128"],
}


def llama_cpp_quantize(src: Path, dest: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def score(cli: list[str], model: Path, args, backend: str, out: Path) -> dict:
    """Perplexity of `model` in `backend`; a result already in --work for the same files is reused."""
    if not out.exists():
        subprocess.run([*cli, "eval", str(model), "--backend", backend, "--threads", str(args.threads), "--windows",
                        str(args.windows), "--output", str(out)], check=True, stdout=subprocess.DEVNULL)
    doc = json.loads(out.read_text())
    r = doc["results"]["wikitext2"]
    return {"perplexity": r["value"], "tokens_scored": r["tokens_scored"], "seconds": round(r["seconds"], 1),
            "bytes": doc["model"]["bytes_on_disk"], "bits_per_parameter": round(doc["model"]["bits_per_parameter"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--work", help="keep artifacts here (default: a temporary directory)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "gguf_reference.json"))
    args = ap.parse_args()
    import llama_cpp

    from compress.artifact import package_versions, write_json_atomic
    from compress.models import load_model
    from export.gguf import check_llama_cpp

    tmp = tempfile.TemporaryDirectory(prefix="gguf-bench-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cli = [str(Path(sys.executable).parent / "compress")]
    rows: dict[str, dict] = {}

    f32 = work / "f32-gguf"
    if not f32.exists():
        subprocess.run([*cli, "export", "--format", "gguf", "--out", str(f32), "--threads", str(args.threads)],
                       check=True, stdout=subprocess.DEVNULL)
    # the tokenizer in the file tokenizes the evaluation text as ours does
    lm = load_model(None)
    text = (ROOT / "compress" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ours = lm.tokenizer(text, add_special_tokens=False).input_ids
    ll = llama_cpp.Llama(model_path=str(f32 / "model.gguf"), vocab_only=True, verbose=False)
    theirs = ll.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    same_tokens = list(theirs) == list(ours)
    print(f"tokenizer: llama.cpp {len(theirs)} tokens, ours {len(ours)}, identical: {same_tokens}", flush=True)
    del ll, lm

    rows["fp32"] = {"gguf_type": "F32", "llama.cpp": score(cli, f32, args, "llama.cpp", work / "f32-ll.json")}
    print("fp32", rows["fp32"], flush=True)
    for name, qargs in ARTIFACTS.items():
        art, gg = work / name, work / f"{name}-gguf"
        if not art.exists():
            subprocess.run([*cli, "quantize", *qargs, "--out", str(art)], check=True, stdout=subprocess.DEVNULL)
        if not gg.exists():
            subprocess.run([*cli, "export", str(art), "--format", "gguf", "--out", str(gg), "--threads",
                            str(args.threads)], check=True, stdout=subprocess.DEVNULL)
        exp = json.loads((gg / "compress.json").read_text())["format_exported"]
        max_abs, max_kl = check_llama_cpp(gg / "model.gguf", load_model(art), threads=args.threads)
        row = {"quantize_args": qargs, "gguf_types": exp["tensor_types"],
               "export_check": {"gguf_reader_max_abs_weight_diff": exp["gguf_reader_max_abs_weight_diff"],
                                "llama_cpp_max_abs_logit_diff": max_abs, "llama_cpp_max_kl": max_kl},
               "torch": score(cli, art, args, "torch", work / f"{name}-torch.json"),
               "llama.cpp": score(cli, gg, args, "llama.cpp", work / f"{name}-ll.json")}
        row["llama_cpp_vs_torch_rel"] = row["llama.cpp"]["perplexity"] / row["torch"]["perplexity"] - 1
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    for name, ftype in (("llama.cpp-own-Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
                        ("llama.cpp-own-Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        d = work / name
        d.mkdir(exist_ok=True)
        if not (d / "model.gguf").exists():
            llama_cpp_quantize(f32 / "model.gguf", d / "model.gguf", ftype, args.threads)
        rows[name] = {"quantizer": "llama_model_quantize from our F32 GGUF",
                      "llama.cpp": score(cli, d, args, "llama.cpp", work / f"{name}.json")}
        print(name, json.dumps(rows[name]), flush=True)
    out = {"command": " ".join(["python", *sys.argv]), "threads": args.threads,
           "protocol": {"task": "wikitext2", "windows": args.windows, "seq_len": 1024},
           "tokenizer_identical_on_test_text": same_tokens, "results": rows, "versions": package_versions()}
    write_json_atomic(Path(args.output), out)
    tmp.cleanup()


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
